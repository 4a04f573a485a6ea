#!/usr/bin/env bash
# A private PostgreSQL server for tests: Debian's package, a cluster in a temporary folder,
# listening on 127.0.0.1 only, trust authentication for user `postgres`.
#   tests/pg.sh install          install Debian's postgresql package if it is missing
#   tests/pg.sh start DIR PORT   create a cluster in DIR and start it on PORT (prints nothing)
#   tests/pg.sh restart DIR PORT start an existing cluster again
#   tests/pg.sh stop DIR         stop it (fast: open connections are cut)
#   tests/pg.sh kill DIR         stop it at once (immediate: as a crash would)
set -euo pipefail

pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_pg() {
    # The server refuses to run as root; Debian's package creates the `postgres` user.
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
install)
    if [ -z "$(pg_bin)" ]; then
        echo "installing Debian's postgresql package (for the ledger's PostgreSQL tests)" >&2
        sudo_=""
        [ "$(id -u)" = 0 ] || sudo_=sudo
        $sudo_ apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q postgresql >/dev/null
    fi
    ;;
start)
    dir=$2 port=$3 bin=$(pg_bin)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chmod a+rx "$(dirname "$dir")"
        chown postgres "$dir"
    fi
    as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    exec bash "$0" restart "$dir" "$port"
    ;;
restart)
    dir=$2 port=$3 bin=$(pg_bin)
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null ||
        { cat "$dir/server.log" >&2; exit 1; }
    ;;
stop | kill)
    dir=$2 mode=fast
    [ "$1" = kill ] && mode=immediate
    as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m "$mode" -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: $0 install | start DIR PORT | restart DIR PORT | stop DIR | kill DIR" >&2
    exit 2
    ;;
esac
