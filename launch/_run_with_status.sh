# Sourced by the launch scripts: run "${cmd[@]}" (a torchrun line), forward SIGTERM/SIGUSR1 to it as
# SIGTERM (torchrun passes it to every worker, which checkpoints at the next step boundary), and exit
# with the status that rank 0 wrote to LSTM_DIST_EXIT_FILE, since torchrun itself reports any worker
# failure, a preemption included, as 1.
echo "+ ${cmd[*]}" >&2
export LSTM_DIST_EXIT_FILE
LSTM_DIST_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/lstm_dist_exit.XXXXXX")
trap 'rm -f "$LSTM_DIST_EXIT_FILE"' EXIT
"${cmd[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM USR1 INT
set +e
while true; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break   # wait returns early when a trapped signal arrives
done
set -e
if [[ -s "$LSTM_DIST_EXIT_FILE" ]]; then
  status=$(<"$LSTM_DIST_EXIT_FILE")
fi
exit "$status"
