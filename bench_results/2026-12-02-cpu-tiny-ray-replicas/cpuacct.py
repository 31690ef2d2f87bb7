# sample cumulative CPU seconds of ray/serve processes until killed; print totals per role at exit
import os, signal, sys, time, collections
tick = os.sysconf("SC_CLK_TCK"); last = {}
def role(cmd):
    for k in ("ServeReplica", "ProxyActor", "ServeController", "raylet", "gcs_server", "runtime.serve", "pipeline bench", "DashboardAgent", "dashboard", "log_monitor", "monitor.py", "RuntimeEnvAgent"):
        if k in cmd: return k
def sample():
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            cmd = open(f"/proc/{p}/cmdline","rb").read().replace(b"\0",b" ").decode(errors="replace")
            r = role(cmd)
            if not r or "cache-ray" not in cmd and r in ("runtime.serve", "pipeline bench"): 
                if not r: continue
            st = open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()
            last[(r, p)] = (int(st[11]) + int(st[12])) / tick
        except OSError: pass
stop = False
def h(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, h)
while not stop:
    sample(); time.sleep(0.5)
tot = collections.defaultdict(float)
for (r, p), v in last.items(): tot[r] += v
for r, v in sorted(tot.items(), key=lambda x: -x[1]): print(f"{r:20s} {v:7.1f} s")
