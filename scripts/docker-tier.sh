#!/usr/bin/env bash
# The docker tier of `make test`: the harness through testcontainers and real containers, and
# through the compose project of docker-compose.test.yml. The rest of the suite keeps the fast
# local backend.
#
#   1. `harness matrix --services=docker` over every loop mode on solo and prefork with Redis;
#   2. pytest --services=docker: one fault scenario, the runbook end to end, and the leak test
#      of the docker backend (the tests marked `docker`);
#   3. `harness compose up`, the default matrix with --services=compose, `harness compose down`.
#
# It runs where a Docker engine answers (DOCKER_HOST, else /var/run/docker.sock). Where none
# does, it says so and runs nothing: `make test` never starts an engine behind a user's back.
# HARNESS_DOCKER_TIER=require (CI) makes a missing engine a failure; =skip skips the tier.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
mode=${HARNESS_DOCKER_TIER:-auto}
case "$mode" in
    skip) echo "docker tier: skipped (HARNESS_DOCKER_TIER=skip)"; exit 0 ;;
    auto | require) ;;
    *) echo "HARNESS_DOCKER_TIER: unknown value '$mode'; use auto, require or skip" >&2; exit 2 ;;
esac
if ! detail=$("$VENV/bin/python" -c '
import os, sys
from harness.services import probe_docker
probe = probe_docker(os.environ)
print(probe.detail)
sys.exit(0 if probe.ok else 1)
'); then
    if [ "$mode" = require ]; then
        echo "docker tier: HARNESS_DOCKER_TIER=require, but no engine answers: $detail" >&2
        echo "  sudo scripts/docker-engine.sh start && eval \$(scripts/docker-engine.sh env)" >&2
        exit 1
    fi
    echo "docker tier: not run, no Docker engine answers ($detail)."
    echo "  To run it: sudo scripts/docker-engine.sh start && eval \$(scripts/docker-engine.sh env)"
    exit 0
fi
echo "docker tier: $detail; images ${HARNESS_POSTGRES_IMAGE:-postgres:16-alpine}," \
    "${HARNESS_REDIS_IMAGE:-redis:7-alpine}"

"$VENV/bin/harness" matrix --services=docker --pool=solo,prefork --broker=redis \
    --loop-mode=all --report=reports/docker-matrix.json

# -k: of the leak tests, only the docker backend's (the main tier ran the local ones).
"$VENV/bin/pytest" -n 2 --dist worksteal --services=docker \
    -k "docker or not leaves_nothing" \
    scenarios/faults/test_sigkill.py scenarios/runbook tests/test_leaks.py tests/test_docker.py

# The compose project: brought down whatever happens to the matrix.
down() { "$VENV/bin/harness" compose down || true; }
trap down EXIT
"$VENV/bin/harness" compose up
"$VENV/bin/harness" matrix --services=compose --report=reports/compose-matrix.json
