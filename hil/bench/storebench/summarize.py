import re, statistics as st, collections
rows=[dict(kv.split('=',1) for kv in l.split() if '=' in kv) for l in open('results/raw.log')]
def get(engine, tag, key, f=float):
    return [f(r[key]) for r in rows if r.get('engine')==engine and r['tag']==tag and key in r]
ENG=["sg","redb","redb-small","fjall","fjall-small","fjall-insert","sqlite"]
def s(vals, best=max, fmt="{:,.0f}"):
    if not vals: return "-"
    b=best(vals); lo,hi=min(vals),max(vals)
    return f"{fmt.format(b)} (med {fmt.format(st.median(vals))}, {fmt.format(lo)}–{fmt.format(hi)})"
out=[]
for e in ENG:
    A=get(e,'A','rec_per_s'); 
    d={}
    d['A rec/s']=s(A)
    d['A MB/s']=s(get(e,'A','payload_MB_per_s'),fmt="{:,.1f}")
    d['A commit p99 ms']=s(get(e,'A','commit_p99_ms'),best=min,fmt="{:.2f}")
    du=get(e,'du','du_kib'); ap=get(e,'du','apparent_bytes')
    d['disk B/rec (du)']=f"{min(du)*1024/1e6:.0f}–{max(du)*1024/1e6:.0f}"
    d['apparent B/rec']=f"{min(ap)/1e6:.0f}–{max(ap)/1e6:.0f}"
    dw=get(e,'A','dev_write_bytes')
    d['A dev writes B/rec']=f"{min(dw)/1e6:.0f}–{max(dw)/1e6:.0f}"
    d['B rec/s']=s(get(e,'B','rec_per_s'))
    dwb=get(e,'B','dev_write_bytes'); d['B dev B/rec']=f"{min(dwb)/2e5:.0f}–{max(dwb)/2e5:.0f}"
    d['C rec/s']=s(get(e,'C','rec_per_s'))
    d['C mean ms']=s(get(e,'C','commit_mean_ms'),best=min,fmt="{:.3f}")
    dwc=get(e,'C','dev_write_bytes'); d['C dev B/commit']=f"{min(dwc)/2000:,.0f}–{max(dwc)/2000:,.0f}"
    d['D warm rec/s']=s(get(e,'D-warm','rec_per_s'))
    d['D cold rec/s']=s(get(e,'D-cold','rec_per_s'))
    # cold open + read
    oc=[float(r['open_ms'])/1e3+float(r['secs']) for r in rows if r.get('engine')==e and r['tag']=='D-cold']
    d['D cold open+read s']=s(oc,best=min,fmt="{:.2f}")
    d['D RSS MiB']=s([v/1024 for v in get(e,'D-warm','vm_hwm_kib')],best=min,fmt="{:.1f}")
    d['E first reopen ms']=s(get(e,'E-warm','reopen_ms'),best=min,fmt="{:.1f}")
    d['E cold reopen ms']=s(get(e,'E-cold','reopen_ms'),best=min,fmt="{:.1f}")
    d['E after crash ms']=s(get(e,'E-after-crash','reopen_ms'),best=min,fmt="{:.1f}")
    d['E after crash RSS MiB']=s([v/1024 for v in get(e,'E-after-crash','vm_hwm_kib')],best=min,fmt="{:.1f}")
    d['crash: all 1M kept']=str(all(r.get('last_key')=='Some(999999)' for r in rows if r.get('engine')==e and r['tag'].startswith('E')))
    d['F RSS MiB (VmHWM)']=s([v/1024 for v in get(e,'A','vm_hwm_end_kib')],best=min,fmt="{:.1f}")
    d['F RSS MiB (time -v)']=s([v/1024 for v in get(e,'A','time_maxrss_kib')],best=min,fmt="{:.1f}")
    d['B RSS MiB']=s([v/1024 for v in get(e,'B','vm_hwm_end_kib')],best=min,fmt="{:.1f}")
    d['threads']=",".join(sorted(set(r['threads'] for r in rows if r.get('engine')==e and r['tag']=='A')))
    d['A close ms']=s(get(e,'A','close_ms'),best=min,fmt="{:.1f}")
    d['A user+sys s']=s([float(r['time_user'])+float(r['time_sys']) for r in rows if r.get('engine')==e and r['tag']=='A'],best=min,fmt="{:.2f}")
    out.append((e,d))
keys=list(out[0][1].keys())
print("| metric | "+" | ".join(e for e,_ in out)+" |")
print("|---|"+"---|"*len(out))
for k in keys:
    print(f"| {k} | "+" | ".join(d[k] for _,d in out)+" |")
