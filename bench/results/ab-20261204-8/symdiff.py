import re,sys
def load(f, rps):
    d={}
    for line in open(f):
        # perf separates the share from the rest by a tab or, in some versions, two spaces.
        line=line.replace('%  ','%\t',1)
        if '\t' not in line: continue
        p,rest=line.split('\t',1)
        try: p=float(p.rstrip('%'))
        except ValueError: continue
        m=re.match(r'(\S+)\s+\[(.)\]\s+(.*)',rest.strip())
        if not m: continue
        dso,kind,sym=m.groups()
        # A binary copied aside is named keyplane-<commit>.
        if dso.startswith('keyplane') or dso=='baseline': dso='APP'
        if kind=='k': dso='kernel'
        key=(dso,sym)
        d[key]=d.get(key,0)+p/100*1e9/rps
    return d
kp=load(sys.argv[1],float(sys.argv[2])); b=load(sys.argv[3],float(sys.argv[4]))
keys=set(kp)|set(b)
diff=sorted(((kp.get(k,0)-b.get(k,0),k) for k in keys),reverse=True)
print("total ns/req", round(sum(kp.values())), round(sum(b.values())))
for dso in ['kernel','APP','libc.so.6','[vdso]']:
    print(dso, round(sum(v for k,v in kp.items() if k[0]==dso)), round(sum(v for k,v in b.items() if k[0]==dso)))
for dv,k in diff[:int(sys.argv[5]) if len(sys.argv)>5 else 45]: print(f"{dv:7.1f} {kp.get(k,0):7.1f} {b.get(k,0):7.1f} {k[0][:8]} {k[1][:110]}")
