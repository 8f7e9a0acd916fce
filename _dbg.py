import time, sys, os
T0 = None
def mark(what):
    try:
        st = open(f"/proc/{os.getpid()}/stat").read().rsplit(")",1)[1].split()
        start = int(st[19]) / os.sysconf("SC_CLK_TCK")
        up = float(open("/proc/uptime").read().split()[0])
        print(f"DBG {what} at {up - start:.2f}", file=sys.stderr, flush=True)
    except Exception as e:
        print("DBG", e, file=sys.stderr)
