import sys, tempfile
from pathlib import Path
from tokenvm_vllm.tiny_llama import write_tiny_llama
from tokenvm_vllm.bench import connector_step_cost as c
K = sys.argv[1]; C = int(sys.argv[2])
tmp = tempfile.mkdtemp(); model = str(write_tiny_llama(Path(tmp) / "tiny", weights=False))
eng = c.Engine(model, True, C, 10240, {"load_defer_steps": K})
added, first, steps = {}, {}, [0]
orig = eng.scheduler.schedule
def sched():
    out = orig()
    for r in out.scheduled_new_reqs: first.setdefault(r.req_id, steps[0])
    return out
eng.scheduler.schedule = sched
queue = c.workload(256, 32, 256, 128); in_flight = 0
while queue or eng.busy():
    while queue and in_flight < C:
        eng.add(queue.pop(0), 32); added[f"r{eng.ids}"] = steps[0]; in_flight += 1
    eng.step(); steps[0] += 1; in_flight = len(eng.scheduler.requests)
w = sorted(first[r] - added[r] for r in added)
q = lambda f: w[min(len(w) - 1, int(len(w) * f))]
print(f"c={C} K={K}: steps {steps[0]}, arrival->scheduled steps p50 {q(.5)} p90 {q(.9)} p99 {q(.99)} max {w[-1]}")
