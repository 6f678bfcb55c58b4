#!/bin/sh
# The entry point of the distfork image: the first argument picks the role.
#
#   broker [ARGS...]   distfork broker --bind "$DISTFORK_BIND" [--metrics-port "$DISTFORK_METRICS_PORT"] ARGS...
#   worker [ARGS...]   distfork worker --connect "$DISTFORK_ADDRESS" ARGS...
#   health             the container's health check (HEALTHCHECK, Kubernetes probes):
#                        broker: it answers `distfork status` on its own port;
#                        worker: the broker answers and lists a worker of this host
#                        (exit 3 if it answers without one, 1 if it does not answer)
#   anything else      run as given (e.g. `distfork status --json`, `sh`)
#
# DISTFORK_HEALTH_TIMEOUT: seconds the health check waits for the broker (default 5).
#
# Keys: set DISTFORK_KEYS_DIR=/keys (a directory made by `distfork keygen`) and
# every distfork command here uses them.
set -eu

role_file="${TMPDIR:-/tmp}/distfork-role"

# tcp://0.0.0.0:7340 -> tcp://127.0.0.1:7340: where this container reaches its own broker
local_address() {
    bind="${DISTFORK_BIND:-tcp://0.0.0.0:7340}"
    host_port="${bind#tcp://}"
    host="${host_port%:*}"
    port="${host_port##*:}"
    case "$host" in
        0.0.0.0 | '*' | '') host=127.0.0.1 ;;
    esac
    echo "tcp://${host}:${port}"
}

role="${1:-worker}"
[ "$#" -gt 0 ] && shift

case "$role" in
    broker)
        echo broker >"$role_file"
        if [ -n "${DISTFORK_METRICS_PORT:-}" ]; then
            set -- --metrics-port "$DISTFORK_METRICS_PORT" "$@"
        fi
        exec distfork broker --bind "${DISTFORK_BIND:-tcp://0.0.0.0:7340}" "$@"
        ;;
    worker)
        echo worker >"$role_file"
        exec distfork worker --connect "${DISTFORK_ADDRESS:?set DISTFORK_ADDRESS to the broker, e.g. tcp://broker:7340}" "$@"
        ;;
    health)
        case "$(cat "$role_file" 2>/dev/null || true)" in
            broker)
                exec distfork status --address "${DISTFORK_HEALTH_ADDRESS:-$(local_address)}" --timeout "${DISTFORK_HEALTH_TIMEOUT:-5}" >/dev/null
                ;;
            worker)
                exec distfork status --address "${DISTFORK_ADDRESS:?}" --timeout "${DISTFORK_HEALTH_TIMEOUT:-5}" \
                    --expect-worker-host "$(uname -n)" >/dev/null
                ;;
            *)
                echo "distfork-entrypoint health: no broker or worker was started in this container" >&2
                exit 1
                ;;
        esac
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
