# Gandalf's everyday commands. Install `just` first: `pip install rust-just`. The dev extra
# has it too (.venv/bin/just after setup); README, Development, gives the plain commands.

python := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python3" }

# list recipes
default:
    @just --list

# create .venv and install Gandalf with its dev tools
setup:
    python3 -m venv .venv
    .venv/bin/pip install -e '.[dev]'

# serve on the shipped gandalf.yaml
run *ARGS:
    {{python}} -m gandalf serve {{ARGS}}

# the test suite (the same command as the README and CI)
test *ARGS:
    {{python}} -m pytest {{ARGS}}

# ruff + mypy (strict)
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
    {{python}} -m mypy

# format the code
fmt:
    {{python}} -m ruff format .
    {{python}} -m ruff check --fix .

# install wrk from Debian's packages when it is missing
_wrk:
    @command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) || (echo "install wrk (e.g. apt-get install wrk)" >&2; exit 2)

# full load bench: mock, baseline (ASGI, RSGI), gandalf (ASGI, RSGI); < 5 minutes; writes bench/results/
bench *ARGS: _wrk
    {{python}} bench/load.py {{ARGS}}

# quick load bench (< 1 minute)
bench-quick *ARGS: _wrk
    {{python}} bench/load.py --quick {{ARGS}}

# in-process micro-benchmarks: microseconds and allocations per request
bench-micro *ARGS:
    {{python}} -m pytest bench/test_micro.py -p no:cacheprovider -q -s {{ARGS}}

# 500,000 requests through gandalf serve, RSS sampled (leak check)
soak *ARGS: _wrk
    {{python}} bench/soak.py {{ARGS}}

# pyinstrument over an in-process run against the mock upstream; HTML + text in bench/results/
profile *ARGS:
    {{python}} bench/profiler.py {{ARGS}}
