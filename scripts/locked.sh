#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Run a command holding the harness lock ($CACHE/build.lock), so that only
# one job changes a harness tree or runs a kernel/selftests build at a time
# (2 cores; and an overlay rewritten under a running build corrupts it).
# Nested calls (LSDEFER_LOCKED=1) run the command directly.
#
# Usage: scripts/locked.sh CMD [ARGS...]
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -gt 0 ] || die "usage: scripts/locked.sh CMD [ARGS...]"
if [ "${LSDEFER_LOCKED:-}" = 1 ]; then
	exec "$@"
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
if ! flock -n 9; then
	info "waiting for another harness job to finish ($CACHE/build.lock)"
	flock 9
fi
LSDEFER_LOCKED=1 exec "$@"
