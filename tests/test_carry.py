"""CRAWLER_CARRY: a later loop's crawler output mixes with loop 0's outputs (beta x + sum alpha carry),
learned in the scalar AdamW group or frozen from the environment, carried in the artifact's config, and
scripts/freeze_carry.py writes a run's learned values into a preset."""
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from conftest import REPO, tiny_hparams as hparams

# flat 0 | crawler blocks 2, 3 x 3 loops | flat 1: no skip or lane between crawler applications
LAYOUT = dict(NUM_FLAT_LAYERS=2, NUM_CRAWLER_LAYERS=2, CRAWLER_LOOPS=3, CONTROL_VECTORS="block", UNET_SKIPS="flat")
BETA, ALPHA = [1.5, 0.5], [[0.25, -0.5], [0.75, 0.125]]
FROZEN = "frozen:1.5,0.5;0.25,-0.5,0.75,0.125"


def model_of(carry):
    h = hparams(**LAYOUT, CRAWLER_CARRY=carry)
    torch.manual_seed(0)
    model = T.GPT(h)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "carry" not in n:
                p.normal_(0, 0.1)
    return h, model


def block_calls(model, x):
    """(block index, input, output) of every block application of one forward, in order."""
    calls = []
    for j, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, j=j: calls.append((j, args[0], out)))
    model(x[:, :-1], x[:, 1:])
    return calls


def test_frozen_carry_mixes_later_loops_with_loop_zero():
    _, model = model_of(FROZEN)
    x = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(1))
    calls = block_calls(model, x)
    assert [j for j, _, _ in calls] == [0, 2, 3, 2, 3, 2, 3, 1]
    out = {(j, (n - 1) // 2 if j > 1 else 0): o for n, (j, _, o) in enumerate(calls)}  # (block, loop): output
    carry = [out[(2, 0)], out[(3, 0)]]
    # loop 0 passes its output on unchanged; each later output reaches the next block as beta x + sum alpha carry
    assert torch.equal(calls[2][1], out[(2, 0)])
    for n in range(3, 7):
        j, k = calls[n][0] - 2, (n - 1) // 2
        mixed = BETA[j] * out[(j + 2, k)] + ALPHA[j][0] * carry[0] + ALPHA[j][1] * carry[1]
        if n + 1 < 7:
            assert torch.allclose(calls[n + 1][1], mixed, atol=1e-6), n


def test_identity_carry_is_no_carry_and_bad_specs_are_refused():
    x = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(2))
    plain = model_of("")[1](x[:, :-1], x[:, 1:])
    assert torch.equal(model_of("frozen:1,1;0,0,0,0")[1](x[:, :-1], x[:, 1:]), plain)
    assert torch.equal(model_of("learned")[1](x[:, :-1], x[:, 1:]), plain)  # starts as the identity
    assert not torch.equal(model_of(FROZEN)[1](x[:, :-1], x[:, 1:]), plain)
    for bad in ("frozen:1,1;0,0,0", "frozen:1;0,0,0,0", "learnt", "frozen:a,b;0,0,0,0"):
        with pytest.raises(T.ConfigError, match="CRAWLER_CARRY=.*use learned, or frozen:<2 betas>;<4 alphas>"):
            hparams(**LAYOUT, CRAWLER_CARRY=bad)
    with pytest.raises(T.ConfigError, match="the lanes must start after the last crawler application"):
        model_of_h = hparams(**dict(LAYOUT, NUM_FLAT_LAYERS=1, NUM_ENCODER_LAYERS=1), CRAWLER_CARRY="learned",
                             PARALLEL_LAST_N=1)
        T.GPT(model_of_h)


def test_learned_carry_trains_in_the_scalar_group_and_frozen_has_no_parameters():
    h, model = model_of("learned")
    matrices, embeds, scalars = T.param_groups(model)
    assert any(p is model.carry_beta for p in scalars) and any(p is model.carry_alpha for p in scalars)
    opts = T.build_optimizers(model, h, T.Run(), T.newton_schulz)
    x = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(3))
    T.Trainer(model, model, opts, h, 1, T.Run().autocast).step([(x[:, :-1], x[:, 1:])], 1.0, 0.9)
    assert not torch.equal(model.carry_beta.detach(), torch.ones(2))
    assert not torch.equal(model.carry_alpha.detach(), torch.zeros(2, 2))
    frozen = model_of(FROZEN)[1]
    assert not [n for n, _ in frozen.named_parameters() if "carry" in n] and "carry_beta" not in frozen.state_dict()


def test_freeze_carry_writes_the_learned_values_into_a_preset(tmp_path):
    h, model = model_of("learned")
    with torch.no_grad():
        model.carry_beta.copy_(torch.tensor([1.5612, 0.5]))
        model.carry_alpha.copy_(torch.tensor([[0.2349, -0.5], [0.75, 0.125]]))
    torch.save(T.float_checkpoint(h, model), tmp_path / "run_model.pt")
    preset = tmp_path / "p.env"
    preset.write_text(': "${NUM_FLAT_LAYERS:=2}"\n: "${CRAWLER_CARRY:=learned}"  # old\n')
    script = [sys.executable, str(REPO / "scripts/freeze_carry.py"), str(tmp_path / "run_model.pt"), "--preset", str(preset)]
    proc = subprocess.run(script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    spec = "frozen:1.56,0.5;0.23,-0.5,0.75,0.12"
    assert preset.read_text() == f': "${{NUM_FLAT_LAYERS:=2}}"\n: "${{CRAWLER_CARRY:={spec}}}"  # learned by run_model.pt\n'
    value = subprocess.run(["bash", "-c", f"source {preset}; echo $CRAWLER_CARRY"], capture_output=True, text=True)
    beta, alpha = hparams(**LAYOUT, CRAWLER_CARRY=value.stdout.strip()).carry_values()
    assert beta.tolist() == pytest.approx([1.56, 0.5]) and alpha.flatten().tolist() == pytest.approx([0.23, -0.5, 0.75, 0.12])
    h.crawler_carry = ""  # a checkpoint without a learned carry
    torch.save(T.float_checkpoint(h, model_of("")[1]), tmp_path / "plain_model.pt")
    proc = subprocess.run(script[:2] + [str(tmp_path / "plain_model.pt")] + script[3:], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no learned carry" in proc.stderr


def test_a_learned_carry_travels_in_the_artifact(corpus, tmp_path):
    """The learned coefficients are exported with the weights and the setting with the model's config: an
    EVAL_ONLY run without CRAWLER_CARRY in its environment scores the artifact exactly as the run did."""
    from conftest import cli, tiny_env
    env = tiny_env(corpus, RUN_ID="carry", CRAWLER_CARRY="learned", ITERATIONS=8, QUANT_METHOD="rtn", EVAL_STRIDE=0)
    rc, err, final, log = cli(env, tmp_path)
    assert rc == 0, err
    assert final["config"]["crawler_carry"] == "learned"
    again_env = {k: v for k, v in env.items() if k != "CRAWLER_CARRY"}
    rc, err, again, _ = cli(dict(again_env, RUN_ID="carry_eval", EVAL_ONLY=str(tmp_path / "logs/carry_model.ptz")), tmp_path)
    assert rc == 0, err
    assert again["roundtrip_val_loss"] == final["roundtrip_val_loss"] and again["config"]["crawler_carry"] == "learned"
    state = torch.load(tmp_path / "logs/carry_model.pt")["model"]
    assert not torch.equal(state["carry_beta"], torch.ones(1))  # trained away from its start
