"""Configs (code, YAML, overrides), the flow-matching objective and bucketed sampling."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from training.cli import train_group
from training.config import CONFIGS, ObjectiveConfig, load_config, save_config
from training.dataset import BucketBatchSampler, Sample, choose_bucket
from training.objective import FlowMatchObjective


def test_configs_yaml_round_trip_and_overrides(tmp_path):
    for name in CONFIGS:
        cfg = load_config(name)
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_config(str(tmp_path / f"{name}.yaml")) == cfg
    (tmp_path / "mine.yaml").write_text(
        "base: debug\noptim:\n  lr: 0.5\ndata:\n  buckets: [[5, 16, 16], [9, 32, 48]]\n"
    )
    cfg = load_config(str(tmp_path / "mine.yaml"), ["model.mode=full", "max_steps=7"])
    assert (cfg.name, cfg.optim.lr, cfg.model.mode, cfg.max_steps) == ("debug", 0.5, "full", 7)
    assert cfg.data.buckets == ((5, 16, 16), (9, 32, 48))
    with pytest.raises(KeyError):
        load_config("debug", ["optim.nope=1"])
    out = CliRunner().invoke(train_group, ["show-config", "lora-1.3b"]).stdout
    assert "lora_rank: 32" in out and "flow_shift: 5.0" in out and "caption_dropout: 0.1" in out


def test_upstream_defaults():
    cfg = load_config("lora-1.3b")
    assert cfg.model.lora_rank == 32 and cfg.optim.lr == 1e-4 and cfg.objective.flow_shift == 5.0
    assert set(cfg.model.lora_targets) == {"to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"}
    assert cfg.data.caption_dropout == 0.1 and cfg.objective.weighting == "bell"
    assert load_config("full-1.3b").optim.lr == 1e-5


def test_flow_matching_objective():
    obj = FlowMatchObjective(ObjectiveConfig(flow_shift=5.0))
    assert obj.weights(obj.schedule).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert obj.weights(obj.schedule).min().item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    sigmas = obj.sample_sigmas(20000, g)
    assert sigmas.median().item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5), abs=0.02)  # shifted uniform
    x0, noise, s = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.25, 1.0])
    assert torch.allclose(obj.noisy_input(x0, noise, s), torch.tensor([[0.75] * 3, [0.0] * 3]))
    plain = FlowMatchObjective(ObjectiveConfig(loss_weighting="none"))
    assert plain.loss(noise - x0, x0, noise, s).item() == 0.0
    assert plain.loss(torch.zeros(2, 3), x0, noise, s).item() == pytest.approx(1.0)
    logit = FlowMatchObjective(ObjectiveConfig(timestep_sampling="logit_normal", flow_shift=1.0))
    assert logit.sample_sigmas(20000, g).mean().item() == pytest.approx(0.5, abs=0.01)


def test_buckets_and_sampler_shard_and_resume(tmp_path):
    buckets = ((81, 480, 832), (81, 832, 480), (33, 480, 832))
    assert choose_bucket(100, 720, 1280, buckets) == (81, 480, 832)
    assert choose_bucket(100, 1280, 720, buckets) == (81, 832, 480)
    assert choose_bucket(50, 720, 1280, buckets) == (33, 480, 832)
    assert choose_bucket(20, 720, 1280, buckets) is None
    samples = [Sample(str(i), tmp_path, "", buckets[i % 2], tmp_path) for i in range(10)]
    ranks = [BucketBatchSampler(samples, 2, seed=1, rank=r, world_size=2, caption_dropout=0.3) for r in (0, 1)]
    epoch = [list(s) for s in ranks]
    assert len(epoch[0]) == len(epoch[1]) == 2
    for batch in epoch[0] + epoch[1]:
        assert len({samples[i].bucket for i, _ in batch}) == 1
    seen = [i for b in epoch[0] + epoch[1] for i, _ in b]
    assert len(seen) == len(set(seen))
    ranks[0].set_position(0, 2)  # two global batches consumed: one by each rank
    assert list(ranks[0]) == epoch[0][1:]
    ranks[0].set_position(1, 0)
    assert list(ranks[0]) != epoch[0]  # a new shuffle each epoch


def test_repeat_by_oversamples_clips_by_metadata_value(tmp_path):
    import json

    from training.dataset import build_samples, clip_repeat

    assert clip_repeat({"process": "blood_flow", "look": "x"}, {"process": {"blood_flow": 3}, "look": {"x": 2}}) == 6
    assert clip_repeat({"process": "mitosis"}, {"process": {"blood_flow": 3}}) == 1
    rows = [{"id": f"c{i}", "video": f"v{i}.mp4", "prompt": "p", "process": "blood_flow" if i < 2 else "diffusion",
             "frames": 9, "height": 32, "width": 32} for i in range(8)]  # fmt: skip
    for r in rows:
        (tmp_path / r["video"]).write_bytes(b"")
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    samples = build_samples(tmp_path, ((9, 32, 32),), tmp_path / "cache", "key", 8, {"process": {"blood_flow": 3}})
    assert [s.repeat for s in samples] == [3, 3, 1, 1, 1, 1, 1, 1]
    sampler = BucketBatchSampler(samples, 2, seed=0, rank=0, world_size=1, repeat=2)
    drawn = [i for b in sampler for i, _ in b]
    assert len(drawn) == 2 * (3 + 3 + 6)
    assert drawn.count(0) == drawn.count(1) == 6 and all(drawn.count(i) == 2 for i in range(2, 8))
    # without repeat_by the epoch is the plain repeated dataset, as before
    plain = build_samples(tmp_path, ((9, 32, 32),), tmp_path / "cache", "key", 8)
    assert sorted(i for b in BucketBatchSampler(plain, 2, 0, 0, 1) for i, _ in b) == list(range(8))


def test_warmup_stable_decay_schedule():
    """Warmup, then constant (exactly diffusers' constant_with_warmup, so a constant run can be finished by a
    decay from its checkpoint), then linear decay to 0 over the last ``decay_steps``."""
    from diffusers.optimization import get_scheduler

    from training.config import OptimConfig
    from training.trainer import build_lr_scheduler

    def lrs(scheduler, n):
        out = []
        for _ in range(n):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    wsd_config = OptimConfig(lr=0.1, schedule="warmup_stable_decay", warmup_steps=4, decay_steps=5)
    wsd = lrs(build_lr_scheduler(wsd_config, opt(), 20), 20)
    const = lrs(get_scheduler("constant_with_warmup", opt(), num_warmup_steps=4), 20)
    assert wsd[:16] == const[:16] and wsd[2] == pytest.approx(0.05) and wsd[15] == pytest.approx(0.1)
    assert wsd[15:] == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02])
    with pytest.raises(ValueError, match="decay_steps"):
        build_lr_scheduler(OptimConfig(schedule="warmup_stable_decay", warmup_steps=4, decay_steps=17), opt(), 20)
    with pytest.raises(ValueError, match="decay_steps"):
        build_lr_scheduler(OptimConfig(schedule="warmup_stable_decay"), opt(), 20)


def test_weighting_is_bell_under_uniform_and_none_under_logit_normal_unless_asked():
    from training.config import ObjectiveConfig

    assert ObjectiveConfig().weighting == "bell"
    assert ObjectiveConfig(timestep_sampling="logit_normal").weighting == "none"
    assert ObjectiveConfig(timestep_sampling="logit_normal", loss_weighting="bell").weighting == "bell"
    sigmas = torch.linspace(0.05, 1, 7)
    assert torch.equal(FlowMatchObjective(ObjectiveConfig(timestep_sampling="logit_normal")).weights(sigmas),
                       torch.ones(7))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_timestep_range_keeps_every_sigma_inside_and_the_default_changes_nothing(sampling):
    from training.config import ObjectiveConfig

    high = FlowMatchObjective(ObjectiveConfig(timestep_sampling=sampling, timestep_range=(0.875, 1.0)))
    s = high.sample_sigmas(4000, torch.Generator().manual_seed(0))
    assert s.min() >= 0.875 and s.max() <= 1.0 and s.std() > 0.01
    plain = FlowMatchObjective(ObjectiveConfig(timestep_sampling=sampling))
    if sampling == "uniform":  # the default range draws exactly as before ranges existed
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        before = plain.schedule[torch.randint(0, 1000, (64,), generator=g2)]
        assert torch.equal(plain.sample_sigmas(64, g1), before)
    with pytest.raises(ValueError, match="timestep_range"):
        FlowMatchObjective(ObjectiveConfig(timestep_range=(0.9, 0.1)))


def test_the_global_batch_order_continues_on_another_number_of_processes(tmp_path):
    """Two ranks consume 3 batches each, then one rank resumes from global batch 6: together they consume the
    single-process sequence of the epoch, in order."""
    samples = [Sample(str(i), tmp_path, "", (5, 16, 16), tmp_path) for i in range(40)]
    single = list(BucketBatchSampler(samples, 2, seed=3, rank=0, world_size=1))
    two = [list(BucketBatchSampler(samples, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    consumed = [b for step in range(3) for b in (two[0][step], two[1][step])]
    resumed = BucketBatchSampler(samples, 2, seed=3, rank=0, world_size=1)
    resumed.set_position(0, 6)
    assert consumed + list(resumed) == single
