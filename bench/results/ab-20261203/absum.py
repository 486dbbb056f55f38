import sys,re,collections,statistics as st
rows=collections.defaultdict(lambda: collections.defaultdict(list))
sit=collections.defaultdict(dict); k=0
for line in open(sys.argv[1]):
    m=re.match(r"(\S+) rps=(\d+) user=([\d.]+) kernel=([\d.]+)",line)
    if not m: continue
    l=m.group(1)
    if l=="hello": k+=1
    rows[l]["rps"].append(float(m.group(2))); rows[l]["user"].append(float(m.group(3))); rows[l]["kernel"].append(float(m.group(4)))
    sit[k][l]=float(m.group(2))
for l,d in rows.items():
    ratios=[sit[s][l]/sit[s]["hello"] for s in sit if l in sit[s]]
    print(f"{l:6} rps med {st.median(d['rps']):8.0f}  user med {st.median(d['user']):.3f}  kernel med {st.median(d['kernel']):.3f}  ratio med {100*st.median(ratios):.1f}% (n={len(ratios)})")
