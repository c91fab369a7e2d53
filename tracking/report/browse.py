"""`browse.html`: one self-contained page to browse a split's samples inside the run (MLflow's artifact
view shows an HTML artifact in a sandboxed iframe with scripts allowed, up to 50 MiB).

The scores, the thumbnails (PNG data URIs: recorded media's own PNGs as they are, other pictures encoded)
or texts are embedded as one JSON object; nothing is fetched at view time. Hand-written JS and inline SVG
(~6 KB of code) instead of an inlined plotting library (plotly's bundle alone is ~4.6 MB). The page holds a scatter (the data map, confidence against
variability, where the split has dynamics; else action against its rank), a grid of the hardest or
easiest by any registered score in its own direction, filters by class and region, and a detail pane;
every element that shows a sample carries `data-sample-id`. Above `MAX_BYTES` (or `MAX_SAMPLES`) the
page keeps the hardest and easiest N by each score, and says so.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tracking.contract import SAMPLE_ID
from tracking.errors import ActionScoresError
from tracking.files import encode_png
from tracking.report.views import SplitView
from tracking.scoring.rank import easiest, hardest
from tracking.scoring.regions import REGION
from tracking.scoring.registry import score_of_column

BROWSE_FILE = "browse.html"
MAX_BYTES = 48 * 2**20  # under MLflow's 50 MiB preview limit, with room for the page's code
MAX_SAMPLES = 20_000  # SVG points the scatter keeps responsive
ESTIMATE_FROM = 256  # samples whose payload sets the estimate of bytes per sample


def score_columns(scores: pd.DataFrame) -> list[str]:
    """The registered score columns of a scores table, in its order."""
    return [column for column in scores.columns if score_of_column(column) is not None]


def _payload(scores: pd.DataFrame, columns: list[str], view: SplitView) -> list[dict]:
    """One JSON-able record per row: id, label, region, every score, and its picture (the view's recorded
    thumbnail as it is, else its pixels encoded) or text."""
    ids = scores[SAMPLE_ID].astype(np.int64).tolist()
    regions = [str(region) for region in scores[REGION]] if REGION in scores else [""] * len(scores)
    values = scores[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    records = []
    for (_, row), sample_id, region, row_values in zip(scores.iterrows(), ids, regions, values.tolist()):
        record = {"id": sample_id, "label": view.label(row), "region": region,
                  "s": {column: (None if value != value else value) for column, value in zip(columns, row_values)}}
        if view.text is not None:
            record["text"] = view.text(sample_id)
        else:
            png = view.thumbnail(sample_id) if view.thumbnail is not None else None
            if png is None:
                png = encode_png(np.ascontiguousarray(view.picture(sample_id)))
            record["img"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        records.append(record)
    return records


def kept_rows(scores: pd.DataFrame, columns: list[str], per_score: int) -> pd.DataFrame:
    """The union of the `per_score` hardest and easiest rows by each score column, in table order."""
    keep = pd.Index([])
    for column in columns:
        keep = keep.union(hardest(scores, column, per_score).index).union(easiest(scores, column, per_score).index)
    return scores.loc[scores.index.isin(keep)]


def write_browse_page(scores: pd.DataFrame, view: SplitView, out_path: Path, title: str,
                      max_bytes: int = MAX_BYTES, max_samples: int = MAX_SAMPLES) -> Path:
    """Write the page for one split's `scores` (the job's table: sample_id, the score columns, region when the
    split has dynamics), its samples shown by `view`: its pictures, or its texts where it has them. Returns
    `out_path`."""
    columns = score_columns(scores)
    if scores.empty or not columns:
        raise ActionScoresError(f"{out_path}: no samples or no registered score columns to browse; "
                                "pass the job's scores table (tracking.scoring)")
    probe = _payload(scores.head(ESTIMATE_FROM), columns, view)
    per_sample = len(json.dumps(probe)) / len(probe) + 1
    fits = min(max_samples, int(max_bytes / per_sample))
    note = ""
    rows = scores
    if len(scores) > fits:
        per_score = max(1, fits // (2 * len(columns)))
        rows = kept_rows(scores, columns, per_score)
        note = (f"{len(rows)} of {len(scores)} samples: the {per_score} hardest and {per_score} easiest by each "
                f"score (the whole split would pass {max_bytes // 2**20} MiB or {max_samples} points)")
    # The whole split: the probe's records are its first ones; a cut: the kept rows, wherever they are.
    records = probe + _payload(scores.iloc[len(probe):], columns, view) if rows is scores else _payload(rows, columns,
                                                                                                       view)
    dynamics = "confidence" in columns and "variability" in columns
    data = {
        "title": title, "note": note, "total": len(scores),
        "scores": [{"name": c, "harder": bool(score_of_column(c).higher_is_harder),
                    "direction": score_of_column(c).direction} for c in columns],
        "map": ({"x": "variability", "y": "confidence", "kind": "data map"} if dynamics
                else {"x": "rank", "y": "action", "kind": "action against rank (1 = hardest)"}),
        "samples": records,
    }
    if not dynamics:  # the rank of every kept sample in the whole split, by action
        order = scores["action"].rank(ascending=False, method="first").astype(int)
        ranks = dict(zip(scores[SAMPLE_ID].astype(int), order))
        for record in records:
            record["s"]["rank"] = int(ranks[record["id"]])
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside the script
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(_PAGE.replace("__TITLE__", _escape(title)).replace("__DATA__", blob), encoding="utf-8")
    return out_path


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px sans-serif;margin:8px;color:#222}
#bar{display:flex;gap:10px;flex-wrap:wrap;align-items:center;margin:6px 0}
#main{display:flex;gap:12px;align-items:flex-start}
#map{border:1px solid #ccc;background:#fff}
#map circle{cursor:pointer;opacity:.75}
#map circle.sel{stroke:#000;stroke-width:2;opacity:1}
#detail{min-width:220px;border:1px solid #ccc;padding:6px}
#detail img,.tile img{image-rendering:pixelated}
#grid{display:flex;flex-wrap:wrap;gap:6px;margin-top:8px}
.tile{border:1px solid #ddd;padding:3px;width:104px;cursor:pointer;font-size:11px}
.tile img{width:96px;height:96px;object-fit:contain}
.tile .t,#detail .t{white-space:pre-wrap;max-height:96px;overflow:hidden;font-size:11px}
#note{color:#a40}
td{padding:0 6px}
</style></head><body>
<h3 id="title"></h3><div id="note"></div>
<div id="bar">
 <label>score <select id="score"></select></label>
 <label>show <select id="which"><option value="hardest">hardest</option><option value="easiest">easiest</option></select></label>
 <label>class <select id="cls"></select></label>
 <label>region <select id="region"></select></label>
 <label>count <input id="count" type="number" value="30" min="1" style="width:60px"></label>
 <span id="shown"></span>
</div>
<div id="main"><svg id="map" viewBox="0 0 560 420" width="560" height="420" style="flex:0 1 560px;height:auto"></svg><div id="detail">hover or click a sample</div></div>
<div id="grid"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D=JSON.parse(document.getElementById('data').textContent);
const $=id=>document.getElementById(id), NS='http://www.w3.org/2000/svg';
const byId=new Map(D.samples.map(s=>[s.id,s]));
const colours={'easy-to-learn':'#2a7','ambiguous':'#e90','hard-to-learn':'#c33','':'#36c'};
$('title').textContent=D.title; $('note').textContent=D.note;
function opts(sel,values){for(const v of values){const o=document.createElement('option');o.value=v;o.textContent=v||'all';sel.appendChild(o);}}
opts($('score'),D.scores.map(s=>s.name));
opts($('cls'),['',...[...new Set(D.samples.map(s=>s.label))].sort()]);
opts($('region'),['',...[...new Set(D.samples.map(s=>s.region))].filter(r=>r).sort()]);
function kept(s){return (!$('cls').value||s.label===$('cls').value)&&(!$('region').value||s.region===$('region').value);}
function media(s){if(s.img){const i=document.createElement('img');i.src=s.img;return i;}
 const t=document.createElement('div');t.className='t';t.textContent=s.text;return t;}
function show(s){const d=$('detail');d.innerHTML='';d.dataset.sampleId=s.id;
 const h=document.createElement('div');h.innerHTML='<b>sample <span class="sid"></span></b> &middot; <span class="lab"></span> <span class="reg"></span>';
 h.querySelector('.sid').textContent=s.id;h.querySelector('.lab').textContent=s.label;h.querySelector('.reg').textContent=s.region;
 d.appendChild(h);const m=media(s);if(s.img){m.width=192;m.height=192;m.style.objectFit='contain';}d.appendChild(m);
 const t=document.createElement('table');for(const [k,v] of Object.entries(s.s)){const r=t.insertRow();r.insertCell().textContent=k;r.insertCell().textContent=v===null?'nan':(+v.toPrecision(4));}
 d.appendChild(t);for(const c of document.querySelectorAll('#map circle.sel'))c.classList.remove('sel');
 const p=document.querySelector('#map circle[data-sample-id="'+s.id+'"]');if(p)p.classList.add('sel');}
function drawMap(){const svg=$('map');svg.innerHTML='';const W=560,H=420,P=40,X=D.map.x,Y=D.map.y;
 const pts=D.samples.filter(s=>s.s[X]!==null&&s.s[Y]!==null);
 const xs=pts.map(s=>s.s[X]),ys=pts.map(s=>s.s[Y]);
 const x0=Math.min(...xs),x1=Math.max(...xs)||1,y0=Math.min(...ys),y1=Math.max(...ys)||1;
 const sx=v=>P+(v-x0)/((x1-x0)||1)*(W-P-10),sy=v=>H-P-(v-y0)/((y1-y0)||1)*(H-P-10);
 const txt=(x,y,s,a)=>{const e=document.createElementNS(NS,'text');e.setAttribute('x',x);e.setAttribute('y',y);if(a)e.setAttribute('transform',a);e.textContent=s;svg.appendChild(e);};
 txt(W/2-30,H-8,X);txt(12,H/2,Y,'rotate(-90 12 '+H/2+')');txt(P,14,D.map.kind);
 txt(P,H-P+14,+x0.toPrecision(3));txt(W-50,H-P+14,+x1.toPrecision(3));txt(2,H-P,+y0.toPrecision(3));txt(2,20,+y1.toPrecision(3));
 for(const s of pts){if(!kept(s))continue;const c=document.createElementNS(NS,'circle');
  c.setAttribute('cx',sx(s.s[X]));c.setAttribute('cy',sy(s.s[Y]));c.setAttribute('r',3.5);c.setAttribute('fill',colours[s.region]||'#36c');
  c.dataset.sampleId=s.id;c.addEventListener('mouseenter',()=>show(s));c.addEventListener('click',()=>show(s));svg.appendChild(c);}}
function drawGrid(){const name=$('score').value,sc=D.scores.find(s=>s.name===name),hard=$('which').value==='hardest';
 const sign=(sc.harder===hard)?-1:1;
 const rows=D.samples.filter(s=>kept(s)&&s.s[name]!==null).sort((a,b)=>sign*(a.s[name]-b.s[name])||a.id-b.id).slice(0,+$('count').value||30);
 $('shown').textContent=rows.length+' '+$('which').value+' by '+name+' ('+sc.direction+'), of '+D.samples.length+' shown, '+D.total+' in the split';
 const g=$('grid');g.innerHTML='';for(const s of rows){const t=document.createElement('div');t.className='tile';t.dataset.sampleId=s.id;
  t.appendChild(media(s));const c=document.createElement('div');c.textContent='#'+s.id+' '+s.label+' '+name+' '+(+s.s[name].toPrecision(3));t.appendChild(c);
  t.addEventListener('click',()=>show(s));g.appendChild(t);}}
function draw(){drawMap();drawGrid();}
for(const id of ['score','which','cls','region','count'])$(id).addEventListener('change',draw);
draw();
</script></body></html>
"""
