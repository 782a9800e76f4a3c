#!/bin/sh
# mqi-job.sh: one engine run, detached from the orchestrator that started it (MQI Communicator,
# tasks/backends/base.py). Started in the job folder by the launch command:
#
#   setsid sh mqi-job.sh GPU TIMEOUT ENGINE_DIR OUTPUT_DIR LOCK_DIR ENGINE [ARG...]
#
# The job folder is the record the orchestrator trusts, whoever asks and whenever:
#   pid          "<pid> <boot id>" of this script: is the job still alive?
#   job.json     host, pid, GPU, timeout, start time (written at once, before the engine runs)
#   engine.log   the engine's stdout and stderr
#   engine.pid   the pid of timeout(1), which runs the engine in a process group of its own (that pid)
#   engine.ended empty, written when the engine has exited: its GPU is free (the lease is released)
#   sha256/NAME  "<sha256> <size>" of each file in OUTPUT_DIR (if one is given), for the download
#   exit.json    the exit code and end time, written last: the job is over when it exists
# The engine runs in ENGINE_DIR (it resolves relative paths from its cwd), under `timeout` (its
# whole process group is killed after TIMEOUT seconds) and holding an flock on
# LOCK_DIR/gpu-GPU.lock, so two engines never share a card even if a GPU lease was lost.
# The orchestrator adds holder.json (who holds the GPU) and, when it stops the job, `cancelled`.

gpu=$1 limit=$2 engine_dir=$3 out_dir=$4 lock_dir=$5
shift 5

boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)
echo "$$ $boot" > pid
printf '{"host": "%s", "pid": %s, "gpu": %s, "timeout": %s, "started": %s}\n' \
  "$(hostname 2>/dev/null || uname -n)" "$$" "$gpu" "$limit" "$(date +%s.%N)" > job.json.tmp
mv job.json.tmp job.json

exec 9>>"$lock_dir/gpu-$gpu.lock"
if flock -w "$limit" 9; then
  # fd 9 stays open in the engine: the GPU stays locked while any engine process lives.
  (cd -- "$engine_dir" && exec timeout -k 10 "$limit" "$@") > engine.log 2>&1 < /dev/null &
  echo $! > engine.pid  # stopping the job signals this group (tasks/backends/base.py: stop_script)
  wait $!
  code=$?
else
  echo "ERROR: GPU $gpu stayed locked by another job for $limit s ($lock_dir/gpu-$gpu.lock)" > engine.log
  code=75
fi
exec 9>&-
: > engine.ended

if [ -n "$out_dir" ]; then
  mkdir -p sha256
  for f in "$out_dir"/*; do
    [ -f "$f" ] || continue
    printf '%s %s\n' "$(sha256sum < "$f" | cut -c1-64)" "$(wc -c < "$f" | tr -d ' ')" > "sha256/${f##*/}"
  done
fi

printf '{"exit": %s, "ended": %s}\n' "$code" "$(date +%s.%N)" > exit.json.tmp
mv exit.json.tmp exit.json
