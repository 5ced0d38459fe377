#!/bin/sh
# `make demo`: a lab set-up in a temporary folder, a real agent, and the real CLI.
set -eu
BIN=${BIN:-.venv/bin}
PATH="$(cd "$BIN" && pwd):$PATH"
if [ -z "${PORT:-}" ]; then
  PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
target="127.0.0.1:$PORT"
dir=$(mktemp -d)
agent=""
cleanup() {
  [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "cmdgate-agent init: CA, certificates, signing key, agent.toml, demo token"
cmdgate-agent init "$dir/lab" --listen "$target"
cmdgate-agent serve --config "$dir/lab/agent.toml" 2>"$dir/agent.log" &
agent=$!
. "$dir/lab/client.env"

tries=0
until cmdgate list "$target" >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -gt 100 ] || ! kill -0 "$agent" 2>/dev/null; then
    echo "the agent did not start:"; cat "$dir/agent.log"; exit 1
  fi
  sleep 0.1
done

step "cmdgate list $target   (the token's whitelist ∩ the host's allowlist)"
cmdgate list "$target"

step "cmdgate run $target disk-usage mount=/   (allowed)"
cmdgate run "$target" disk-usage mount=/

step "cmdgate run $target free   (the host allows it, the token does not: exit 77)"
rc=0; cmdgate run "$target" free || rc=$?
echo "exit code: $rc"; [ "$rc" -eq 77 ]

step "cmdgate run $target echo 'message=hi; touch /tmp/pwned'   (no shell: invalid parameter, exit 64)"
rc=0; cmdgate run "$target" echo 'message=hi; touch /tmp/pwned' || rc=$?
echo "exit code: $rc"; [ "$rc" -eq 64 ]

step "stop the agent (SIGTERM): runs drain, the audit ends with a signed checkpoint"
kill -TERM "$agent" && wait "$agent"; agent=""

step "audit log: one record per decision, denials included ($dir/lab/audit.jsonl)"
cat "$dir/lab/audit.jsonl"

step "cmdgate audit verify: the hash chain and the checkpoint signatures"
cmdgate audit verify "$dir/lab/audit.jsonl" --pubkey "$dir/lab/state/audit-key.pub"
cmdgate audit summary "$dir/lab/audit.jsonl"

step "agent log"
cat "$dir/agent.log"
echo
echo "demo OK"
