#!/usr/bin/env bash
# A private Docker engine for machines that have none (CI, a fresh dev box), and the stand-in
# images the harness's docker tier runs when no registry can be reached.
#
#   scripts/docker-engine.sh start    install (if needed), start the engine, build missing images
#   scripts/docker-engine.sh stop     stop the engine this script started, and its containers
#   scripts/docker-engine.sh status   say whether it runs; exit 0 only if it answers
#   scripts/docker-engine.sh env      the variables that point Docker clients at it (eval them)
#   scripts/docker-engine.sh images   build the stand-in images that are missing (engine up)
#
# It never touches /var/run/docker.sock, the host's firewall or its forwarding: the engine runs
# with its own socket, data and exec roots under $HARNESS_ENGINE_DIR, --iptables=false and
# --ip-forward=false, and publishes ports on 127.0.0.1 only. Every step is idempotent: a second
# `start` finds the engine answering and the images present, and returns in well under a second.
# Nothing in `make test` or `make matrix` calls it: an engine is never started behind a user's
# back. .ci/run does, and stops it whatever happened.
set -euo pipefail

DIR=${HARNESS_ENGINE_DIR:-/var/lib/ingest-harness-engine}
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/docker.pid"
LOG="$DIR/dockerd.log"
# The stand-in images: built here from Debian's packages, named for what they are. The harness
# runs them when HARNESS_POSTGRES_IMAGE / HARNESS_REDIS_IMAGE name them (`env` prints that).
# Bump STANDIN_REV when the recipe below changes, so that machines that have the old images
# build the new ones.
STANDIN_REV=1
STANDIN_TAG="bookworm-r$STANDIN_REV"
PG_IMAGE="ingest-harness/postgres-debian:15-$STANDIN_TAG"
REDIS_IMAGE="ingest-harness/redis-debian:7-$STANDIN_TAG"
RABBITMQ_IMAGE="ingest-harness/rabbitmq-debian:3.10-$STANDIN_TAG"
SUITE=bookworm
MIRROR=${HARNESS_DEBIAN_MIRROR:-}

say() { echo "docker-engine: $*" >&2; }
die() { say "$*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "needs root (dockerd and debootstrap do); run it with sudo"
}

ping_engine() {
    # The engine's own answer, not just a socket file: curl talks HTTP over the unix socket.
    [ -S "$SOCK" ] && curl -fsS --max-time 2 --unix-socket "$SOCK" http://docker/_ping >/dev/null 2>&1
}

dk() { DOCKER_HOST="unix://$SOCK" docker "$@"; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    [ ${#missing[@]} -eq 0 ] && return 0
    # docker.io's maintainer scripts would start a system dockerd on the default socket unless
    # policy-rc.d forbids starting services during package installs.
    if ! { [ -x /usr/sbin/policy-rc.d ] && ! /usr/sbin/policy-rc.d >/dev/null 2>&1; }; then
        die "not installing ${missing[*]}: /usr/sbin/policy-rc.d does not stop package installs " \
            "from starting services, and docker.io would start a system engine. Install them " \
            "yourself, or add a policy-rc.d that exits 101."
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: no needrestart, which could restart the machine's own services.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_engine() {
    if ping_engine; then
        return 0
    fi
    mkdir -p "$DIR/root" "$DIR/exec"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        die "a dockerd (pid $(cat "$PIDFILE")) holds $DIR but does not answer on $SOCK; " \
            "stop it with: $0 stop (log: $LOG)"
    fi
    rm -f "$PIDFILE" "$SOCK"
    say "starting a private engine on unix://$SOCK (log $LOG)"
    # setsid: the engine is not in the caller's process group, so a Ctrl-C meant for the tests
    # does not kill it mid-way; `stop` does.
    setsid dockerd \
        -H "unix://$SOCK" --data-root "$DIR/root" --exec-root "$DIR/exec" \
        --pidfile "$PIDFILE" --storage-driver=overlay2 \
        --iptables=false --ip6tables=false --ip-forward=false --ip=127.0.0.1 \
        --shutdown-timeout 5 --log-level warn \
        </dev/null >"$LOG" 2>&1 &
    local i
    for i in $(seq 1 300); do
        ping_engine && return 0
        [ -f "$PIDFILE" ] || kill -0 $! 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$LOG" >&2 || true
    die "the engine did not answer on $SOCK within 30 s (log above, $LOG)"
}

stop_engine() {
    if [ ! -f "$PIDFILE" ]; then
        say "no engine of this script runs ($PIDFILE absent)"
        return 0
    fi
    local pid
    pid=$(cat "$PIDFILE")
    if ping_engine; then
        # Containers first, so that none is left running in the data root for the next start.
        local ids
        ids=$(dk ps -aq 2>/dev/null || true)
        [ -n "$ids" ] && dk rm -f -v $ids >/dev/null 2>&1 || true
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "dockerd (pid $pid) ignored SIGTERM for 15 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # Its containerd and shims go with it; anything left in the exec root is ours to end.
    pkill -KILL -f -- "$DIR/exec" 2>/dev/null || true
    rm -f "$PIDFILE" "$SOCK"
    say "stopped"
}

# -- stand-in images --------------------------------------------------------------------------

apt_mirror() {
    if [ -n "$MIRROR" ]; then
        echo "$MIRROR"
        return
    fi
    # The machine's own Debian source (deb822 or one-line format).
    local uri
    uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -v security | head -n1 | awk '{print ($1=="deb") ? ($2 ~ /^\[/ ? $3 : $2) : $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

build_rootfs() {
    local root=$1
    say "building a Debian $SUITE root with postgresql-15, redis-server and rabbitmq-server (once per machine, ~1 min)"
    debootstrap --variant=minbase --foreign \
        --include=postgresql-15,redis-server,rabbitmq-server \
        "$SUITE" "$root" "$(apt_mirror)" >"$DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$DIR/debootstrap.log" >&2; die "debootstrap (first stage) failed; log $DIR/debootstrap.log"; }
    # No service may start inside the root while its packages configure.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod +x "$root/usr/sbin/policy-rc.d"
    unshare --net --mount --propagation private \
        chroot "$root" /debootstrap/debootstrap --second-stage >>"$DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$DIR/debootstrap.log" >&2; die "debootstrap (second stage) failed; log $DIR/debootstrap.log"; }
    # What a server needs at run time only: no apt lists or caches, docs, locales, or the JIT.
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian \
        "$root"/var/log/*.log "$root"/debootstrap
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$root"/usr/lib/postgresql/15/lib/bitcode "$root"/usr/lib/postgresql/15/lib/llvmjit*
    rm -f "$root"/usr/lib/x86_64-linux-gnu/libLLVM* "$root"/usr/lib/aarch64-linux-gnu/libLLVM*
    install -m 0755 /dev/stdin "$root/usr/local/bin/postgres-entrypoint" <<'EOF'
#!/bin/sh
# As the official postgres image: initdb on first start, honouring POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB and PGDATA; then postgres in the foreground, as `postgres`.
set -e
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
BIN=/usr/lib/postgresql/15/bin
# `postgres -c name=value ...` (or only flags) as the command, as the official image takes it;
# any other command runs as it is.
if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi
[ "$1" = postgres ] || exec "$@"
shift
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /run/postgresql
    chown postgres:postgres "$PGDATA" /run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pw=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pw"
    auth=scram-sha-256
    [ -n "${POSTGRES_PASSWORD:-}" ] || auth=trust
    "$BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" --auth-local=trust \
        --auth-host="$auth" --no-sync -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pw"
    echo "host all all all $auth" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        "$BIN/postgres" --single -D "$PGDATA" -c fsync=off postgres >/dev/null <<SQL
CREATE DATABASE "$POSTGRES_DB" OWNER "$POSTGRES_USER";
SQL
    fi
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' \
    -c unix_socket_directories=/run/postgresql "$@"
EOF
    install -m 0755 /dev/stdin "$root/usr/local/bin/redis-entrypoint" <<'EOF'
#!/bin/sh
# As the official redis image: reachable from outside the container, nothing on disk by default.
set -e
if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    shift
    set -- redis-server --protected-mode no --bind 0.0.0.0 --save '' --appendonly no "$@"
fi
cd /var/lib/redis
exec setpriv --reuid=redis --regid=redis --init-groups "$@"
EOF
    install -m 0755 /dev/stdin "$root/usr/local/bin/rabbitmq-entrypoint" <<'EOF'
#!/bin/sh
# As the official rabbitmq image: RABBITMQ_DEFAULT_USER / _PASS, listening on 5672.
set -e
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
export RABBITMQ_DEFAULT_USER="${RABBITMQ_DEFAULT_USER:-guest}"
export RABBITMQ_DEFAULT_PASS="${RABBITMQ_DEFAULT_PASS:-guest}"
# guest may log in from outside the container, as in the official image.
echo 'loopback_users = none' >/etc/rabbitmq/rabbitmq.conf
export HOME=/var/lib/rabbitmq
[ $# -gt 0 ] || set -- rabbitmq-server
exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$@"
EOF
}

import_image() {
    local tarball=$1 name=$2
    shift 2
    dk image inspect "$name" >/dev/null 2>&1 && return 0
    say "importing $name"
    local changes=() c
    for c in "$@"; do changes+=(--change "$c"); done
    dk import "${changes[@]}" "$tarball" "$name" >/dev/null
}

build_images() {
    local have=1 name
    for name in "$PG_IMAGE" "$REDIS_IMAGE" "$RABBITMQ_IMAGE"; do
        dk image inspect "$name" >/dev/null 2>&1 || have=0
    done
    [ $have -eq 1 ] && return 0
    local work tarball
    work=$(mktemp -d "${TMPDIR:-/tmp}/ingest-harness-rootfs.XXXXXX")
    # shellcheck disable=SC2064 # expand now: the trap must remove this build's dir
    trap "rm -rf '$work'; trap - INT TERM" RETURN
    # ... also when the build is interrupted (Ctrl-C, a CI timeout's SIGTERM): ~800 MB of root.
    # shellcheck disable=SC2064
    trap "rm -rf '$work'; trap - INT TERM; kill -s TERM \$\$" INT TERM
    tarball="$DIR/standin-$SUITE.tar"
    if [ ! -s "$tarball" ]; then
        build_rootfs "$work/root"
        tar -C "$work/root" --numeric-owner -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
    fi
    # The images share one layer (the same tarball); once they exist it is only disk.
    trap "rm -rf '$work' '$tarball'" RETURN
    local path='PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    import_image "$tarball" "$PG_IMAGE" "ENV $path" 'ENV PGDATA=/var/lib/postgresql/data' \
        'ENV LANG=C.UTF-8' 'EXPOSE 5432' \
        'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]' 'CMD ["postgres"]'
    import_image "$tarball" "$REDIS_IMAGE" "ENV $path" 'EXPOSE 6379' \
        'ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]' 'CMD ["redis-server"]'
    import_image "$tarball" "$RABBITMQ_IMAGE" "ENV $path" 'ENV LANG=C.UTF-8' 'EXPOSE 5672' \
        'ENTRYPOINT ["/usr/local/bin/rabbitmq-entrypoint"]' 'CMD ["rabbitmq-server"]'
}

print_env() {
    cat <<EOF
export DOCKER_HOST=unix://$SOCK
export HARNESS_POSTGRES_IMAGE=$PG_IMAGE
export HARNESS_REDIS_IMAGE=$REDIS_IMAGE
export HARNESS_RABBITMQ_IMAGE=$RABBITMQ_IMAGE
EOF
}

case "${1:-}" in
    start)
        need_root
        ping_engine || install_packages
        start_engine
        build_images
        ;;
    stop) need_root; stop_engine ;;
    status)
        if ping_engine; then say "answers on unix://$SOCK"; else say "not running ($SOCK)"; exit 1; fi
        ;;
    env) print_env ;;
    images) ping_engine || die "no engine answers on $SOCK; run: $0 start"; build_images ;;
    *) echo "usage: $0 start|stop|status|env|images" >&2; exit 2 ;;
esac
