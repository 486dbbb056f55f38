import sys, time
pid, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
import os
t0=time.time(); rows=[]
while not os.path.exists(stop):
    try:
        d={}
        for line in open(f"/proc/{pid}/status"):
            k,_,v=line.partition(':')
            if k in ("VmRSS","RssAnon","RssFile"): d[k]=int(v.split()[0])//1024
        rows.append((round(time.time()-t0,3), d["VmRSS"], d["RssAnon"], d["RssFile"]))
    except Exception: break
    time.sleep(0.01)
open(out,"w").write("\n".join(" ".join(map(str,r)) for r in rows)+"\n")
