"""``microverse bench``: the CPU smoke run on the tiny model writes every field the GPU run reports."""

import json
import math
from types import SimpleNamespace

from click.testing import CliRunner

from microverse.cli import main
from microverse.tools.inference_bench import WAN_1_3B, transformer_flops


def test_flop_model_matches_the_h100_reference():
    config = SimpleNamespace(**WAN_1_3B)
    # shared/reference/h100_wan13b_components.json: 282.835058688 TFLOP per forward at 480x832x81 (32,760 tokens)
    assert math.isclose(transformer_flops(config, 21 * 30 * 52, 512), 282.835058688e12, rel_tol=1e-12)


def test_cpu_smoke_run_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--size", "tiny", "--height", "32", "--width", "32", "--num-frames", "5", "--steps", "5",
            "--repeats", "1", "--warmup-steps", "1", "--draft-batch", "2", "--device", "cpu",
            "--presets", "exact,fast,fast@fast_step_ratio=0.2:fast_cfg_cutoff=1",
            "--cache-dir", str(tmp_path / "cache"), "-o", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "exact" in result.output and "fast" in result.output
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["size"] == "tiny" and r["diffusers"]
    assert r["shape"] == {"height": 32, "width": 32, "num_frames": 5, "steps": 5, "guidance_scale": 5.0, "seed": 0,
                          "text_tokens": 32, "video_tokens": 2 * 2 * 2}
    b = r["baseline"]
    assert b["seconds"] > 0 and b["denoise_s_per_step"] > 0 and b["tflops"] > 0 and b["transformer_forwards"] == 10
    exact, fast = r["presets"]["exact"], r["presets"]["fast"]
    for p in (exact, fast):
        assert p["seconds"] > 0 and p["ratio_to_plain"] == p["seconds"] / b["seconds"] and p["tflops_achieved"] > 0
        assert set(p) >= {"denoise_s_per_step", "peak_gib", "latent_rel_l2", "psnr_db", "vae_decode_psnr_db",
                          "prompt_cache", "speedup", "tflops_effective"}
    assert exact["latent_rel_l2"] < 1e-5 and exact["psnr_db"] > 50
    assert exact["steps_run"] == 5 and exact["transformer_calls"] == exact["full_forwards"] == 10
    assert fast["steps_run"] == 2 and fast["cfg_steps"] == 2 and fast["transformer_calls"] == 4
    assert fast["latent_rel_l2"] > 0
    variant = r["presets"]["fast@fast_step_ratio=0.2:fast_cfg_cutoff=1"]
    assert variant["steps_run"] == 1 and variant["cfg_steps"] == 1 and variant["transformer_calls"] == 2
    assert exact["prompt_cache"]["hits"] > 0
    d = r["draft"]
    assert d["batch"] == 2 and d["b2_videos_per_s"] > 0 and d["throughput_ratio"] > 0


def test_random_1_3b_checkpoint_layout(tmp_path, monkeypatch):
    """The 1.3b builder's code path at shrunken widths: full Wan VAE, UniPC flow scheduler, 512-token defaults."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from microverse.tools import inference_bench as bench

    monkeypatch.setattr(bench, "WAN_1_3B", {**bench.WAN_1_3B, "num_layers": 1, "num_attention_heads": 2,
                                            "attention_head_dim": 8, "ffn_dim": 16, "text_dim": 32, "freq_dim": 16})
    monkeypatch.setattr(bench, "TEXT_ENCODER_1_3B", {**bench.TEXT_ENCODER_1_3B, "d_model": 32, "d_kv": 8, "d_ff": 16,
                                                     "num_heads": 4})
    path = bench.save_random_checkpoint(tmp_path / "wan", "1.3b")
    assert bench.save_random_checkpoint(path, "1.3b") == path  # reused, not rebuilt
    pipe = WanPipeline.from_pretrained(str(path))
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 3.0
    assert pipe.vae.config.base_dim == 96 and pipe.vae.config.z_dim == 16
    assert pipe.text_encoder.config.num_layers == 2 and pipe.text_encoder.config.d_model == 32
    assert json.loads((path / "microverse_defaults.json").read_text())["max_sequence_length"] == 512
    assert bench.video_tokens(pipe, 480, 832, 81) == 32760
