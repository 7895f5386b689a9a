"""The runbook's debugging section, provoked on the real stack: one module per fault."""
