#!/usr/bin/env bash
# Replace the api replicas one at a time, with no failed request:
#
#   for each running replica: start one new replica (current image and settings),
#   wait until Docker reports it healthy, then stop the old one gracefully
#   (SIGTERM: gunicorn finishes its in-flight requests) and remove it.
#
# nginx resolves the replicas per request (deploy/nginx/nginx.conf), so it sends
# traffic to the new replica as soon as it runs and retries a request that meets
# a stopping one on another replica. If a new replica never gets healthy, the
# rollout stops there: the old replicas keep serving, and the exit code is 1.
#
# Usage: deploy/compose/rollout.sh   (make rollout builds the image first)
# Environment: ROLLOUT_SERVICE (api), ROLLOUT_HEALTHY_WITHIN (120 s),
# ROLLOUT_STOP_TIMEOUT (30 s, compose's stop_grace_period), and docker
# compose's own (COMPOSE_PROJECT_NAME, COMPOSE_FILE, ...).
set -euo pipefail

service=${ROLLOUT_SERVICE:-api}
healthy_within=${ROLLOUT_HEALTHY_WITHIN:-120}
stop_timeout=${ROLLOUT_STOP_TIMEOUT:-30}

running() { docker compose ps -q "$service" | sort; }

health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1"; }

mapfile -t old < <(running)
n=${#old[@]}
if ((n == 0)); then
  echo "rollout: no running $service replica; start the stack with: docker compose up -d --wait" >&2
  exit 1
fi
echo "rollout: replacing $n $service replica(s), one at a time"

for previous in "${old[@]}"; do
  mapfile -t before < <(running)
  docker compose up -d --no-deps --no-recreate --scale "$service=$((${#before[@]} + 1))" "$service" >/dev/null
  new=$(comm -13 <(printf '%s\n' "${before[@]}") <(running) | head -n 1)
  if [[ -z $new ]]; then
    echo "rollout: no new $service replica was started" >&2
    exit 1
  fi
  deadline=$((SECONDS + healthy_within))
  until [[ $(health "$new") == healthy ]]; do
    if ((SECONDS > deadline)) || [[ $(health "$new") =~ ^(unhealthy|exited|dead)$ ]]; then
      echo "rollout: new replica ${new:0:12} is $(health "$new"); removing it, the old ones keep serving" >&2
      docker logs --tail 20 "$new" >&2 || true
      docker rm -f "$new" >/dev/null
      exit 1
    fi
    sleep 1
  done
  docker stop -t "$stop_timeout" "$previous" >/dev/null
  docker rm "$previous" >/dev/null
  echo "rollout: ${previous:0:12} -> ${new:0:12} (healthy)"
done
echo "rollout: done, $n $service replica(s) replaced"
