"""Identity-initialized MEND (normalizer statistics from 16 training edits, no training) at several step sizes α.

    OMP_NUM_THREADS=2 python bench/mend_alpha_sweep.py

Shows how much of MEND on SmolLM2-135M is the step size: ES / paraphrase / locality (exact
top-1 agreement on the neighborhood answer) on the first 6 edit-split records of
counterfact_dev_mend.json. Prints one line per α.
"""
import time

import torch

from kedit import paths

import kedit
from kedit.editors.mend import MEND, MENDNet, MENDHparams, edited_weights, weight_dims, gradient_inputs
from kedit.data.loaders import load_requests, read_records
from kedit.data.encode import encode, model_inputs, target_logprobs
DATA = str(paths.data_dir(required=True))  # $KEDIT_DATA (kedit.paths)
torch.set_num_threads(2)
m, tok = kedit.load_model("smollm2-135m")
hp = MENDHparams(rank=8)
names = edited_weights(m, hp)
net = MENDNet(hp, weight_dims(m, names)).train()
train = load_requests(DATA + "/counterfact/counterfact_train_mend.json", limit=16)
for i in range(0, 16, 4):
    b = encode(tok, [r.prompt for r in train[i:i+4]], [r.target_new for r in train[i:i+4]])
    u, d, ex = gradient_inputs(m, names, b, False)
    for n in names:
        net.norm_u[n.replace(".", "__")].update(u[n]); net.norm_d[n.replace(".", "__")].update(d[n])
net.eval()
recs = [r for r in read_records(DATA + "/counterfact/counterfact_dev_mend.json") if r["mend_split"] == "edit"][:6]
reqs = load_requests(recs, format="counterfact_mend")
def score(model, prompts, targets):
    b = encode(tok, prompts, targets)
    with torch.no_grad():
        lp, c, n = target_logprobs(model(**model_inputs(b)).logits, b["labels"])
    return (c == n).float().tolist()
for alpha in [1e-4, 1e-3, 3e-3, 1e-2]:
    for p in net.alpha.values(): p.data.fill_(alpha)
    ed = MEND(hp, net=net)
    es, ps, loc = [], [], []
    t = time.time()
    for r in reqs:
        pre_loc = score(m, [r.neighborhood[0].prompt], [r.neighborhood[0].answer])
        e = ed.edit(m, tok, r)
        with e.applied(m):
            es += score(m, [r.prompt], [r.target_new]); ps += score(m, r.paraphrase_prompts[:1], [r.target_new])
            loc += [float(a == b) for a, b in zip(score(m, [r.neighborhood[0].prompt], [r.neighborhood[0].answer]), pre_loc)]
    print(f"alpha {alpha:g}: ES {sum(es)/len(es):.2f} PS {sum(ps)/len(ps):.2f} loc(exact-agree) {sum(loc)/len(loc):.2f}  {time.time()-t:.0f}s", flush=True)
