"""Loading Stable Diffusion offline (folder + original single file), embedding formats, input.json validation.

A tiny random SD v1 (same component types, real CLIP tokenizer) stands in for the 4 GB model.
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from difflab.personalize.embeddings import expand_prompt, load_embeddings, read_embeddings, save_embeddings
from difflab.personalize.prompts import load_input_json
from difflab.personalize.sd import load_sd
from difflab.utils import DifflabError

RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict, layers_per_block: int, up_has_attn: list[bool]) -> dict:
    """Diffusers UNet names -> the original LDM layout (input_blocks / middle_block / output_blocks)."""
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    n = layers_per_block + 1
    out = {}
    for k, v in state.items():
        head, _, leaf = k.rpartition(".")
        if head in fixed:
            out[f"{fixed[head]}.{leaf}"] = v
            continue
        m = re.match(
            r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)",
            k,
        )
        kind, block, part, j, rest = m.groups()
        block, j = int(block or 0), int(j)
        if part == "resnets":
            first, _, tail = rest.partition(".")
            rest = f"{RESNET_TO_LDM[first]}.{tail}"
        if kind == "mid_block":
            out[f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"] = v
        elif kind == "down_blocks":
            if part == "downsamplers":
                out[f"input_blocks.{n * (block + 1)}.0.op.{rest.removeprefix('conv.')}"] = v
            else:
                out[f"input_blocks.{n * block + j + 1}.{0 if part == 'resnets' else 1}.{rest}"] = v
        elif part == "upsamplers":
            out[f"output_blocks.{n * block + n - 1}.{2 if up_has_attn[block] else 1}.{rest}"] = v
        else:
            out[f"output_blocks.{n * block + j}.{0 if part == 'resnets' else 1}.{rest}"] = v
    return out


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    out = {}
    for k, v in state.items():
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample",
            k,
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in VAE_ATTN_TO_LDM.items():
                k = k.replace(f".{a}.", f".{b}.")
            if v.dim() == 2:  # the original uses 1x1 convolutions
                v = v[:, :, None, None]
        out[k] = v
    return out


def pipe_to_ldm(pipe) -> dict:
    unet_cfg = pipe.unet.config
    up_attn = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    sd = {
        f"model.diffusion_model.{k}": v
        for k, v in unet_to_ldm(pipe.unet.state_dict(), unet_cfg.layers_per_block, up_attn).items()
    }
    sd |= {
        f"first_stage_model.{k}": v
        for k, v in vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.down_block_types)).items()
    }
    # sd-v1-4.ckpt names the text encoder weights `cond_stage_model.transformer.text_model.*`.
    sd |= {
        f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
        for k, v in pipe.text_encoder.state_dict().items()
    }
    return {k: v.contiguous() for k, v in sd.items()}


class TrainerState:
    """Stands for the training-framework objects that original .ckpt files pickle beside the weights."""

    def __init__(self):
        self.best = 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("tiny_sd")
    pipe = tiny_sd(seed=0)
    pipe.save_pretrained(root / "diffusers")
    # A configs folder for the tiny architecture, the way configs/sd-v1 describes the real one.
    pipe.save_pretrained(root / "configs")
    for f in (root / "configs").rglob("*.safetensors"):
        f.unlink()
    return {"pipe": pipe, "root": root, "dir": root / "diffusers", "configs": root / "configs"}


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def test_load_diffusers_folder(tiny):
    pipe = load_sd(tiny["dir"], device="cpu")
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert_same_weights(pipe, tiny["pipe"])
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_missing_component_is_named(tiny, tmp_path):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(tiny["dir"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(DifflabError, match="missing vae"):
        load_sd(broken)
    with pytest.raises(DifflabError, match="not found"):
        load_sd(tmp_path / "nope")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_original_layout_round_trips(tiny, tmp_path, suffix):
    ldm = pipe_to_ldm(tiny["pipe"])
    path = tmp_path / f"tiny-sd{suffix}"
    if suffix == ".safetensors":
        save_file(ldm, str(path))
    else:  # like sd-v1-4.ckpt: nested state_dict plus pickled non-tensor objects
        torch.save({"state_dict": ldm, "global_step": 470000, "callbacks": {"ModelCheckpoint": TrainerState()}}, path)
    pipe = load_sd(path, device="cpu", config_dir=tiny["configs"])
    assert_same_weights(pipe, tiny["pipe"])
    if suffix == ".safetensors":  # diffusers' own single-file reader agrees that the file is in the original layout
        from diffusers import StableDiffusionPipeline

        theirs = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(tiny["dir"]),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
        assert_same_weights(theirs, pipe)
    # Same images as the diffusers-format model: the whole pipeline is wired the same way.
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = tiny["pipe"]("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-5


def test_not_sd_v1_checkpoint(tiny, tmp_path):
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(DifflabError, match=r"not a Stable Diffusion v1 checkpoint: no model\.diffusion_model"):
        load_sd(other)
    # Right layout but the wrong size for SD v1 (the shipped configs): the message says what was expected.
    small = tmp_path / "small.safetensors"
    save_file(pipe_to_ldm(tiny["pipe"]), str(small))
    with pytest.raises(DifflabError, match=r"shape \(32, 4, 3, 3\), expected \(320, 4, 3, 3\)"):
        load_sd(small)
    bad = tmp_path / "junk.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DifflabError, match="not a readable Stable Diffusion checkpoint: not a PyTorch file"):
        load_sd(bad)


def test_incomplete_checkpoint_names_missing_weight(tiny, tmp_path):
    ldm = pipe_to_ldm(tiny["pipe"])
    del ldm["model.diffusion_model.out.2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(ldm, str(path))
    with pytest.raises(DifflabError, match="unet weights incomplete.*conv_out.weight"):
        load_sd(path, config_dir=tiny["configs"])


def test_shipped_sd_v1_configs_match_spec():
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from difflab.clip.tokenizer import load_clip_tokenizer
    from difflab.configs import SD_V1_CONFIG

    unet = UNet2DConditionModel.load_config(SD_V1_CONFIG / "unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert AutoencoderKL.load_config(SD_V1_CONFIG / "vae")["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(SD_V1_CONFIG / "text_encoder", local_files_only=True)
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.intermediate_size,
        text.max_position_embeddings,
        text.vocab_size,
        text.hidden_act,
    ) == (768, 12, 12, 3072, 77, 49408, "quick_gelu")
    sched = PNDMScheduler.from_config(PNDMScheduler.load_config(SD_V1_CONFIG / "scheduler"))
    assert sched.config.beta_schedule == "scaled_linear"
    assert torch.allclose(sched.betas[[0, -1]], torch.tensor([0.00085, 0.012]), atol=1e-7)
    shipped = load_clip_tokenizer()
    # OpenAI's ids, as their CLIP README and every CLIP tokenizer give them.
    assert shipped("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert shipped("a photo of a dog").input_ids[-2] == 1929 and len(shipped) == 49408


# ---- embeddings --------------------------------------------------------------------------------------------


def encode(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        return pipe.text_encoder(ids)[0]


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_saved_embeddings_load_in_diffusers(tiny, tmp_path, num_vectors):
    vecs = torch.randn(num_vectors, 32, generator=torch.Generator().manual_seed(1))
    path = save_embeddings(tmp_path / "learned_embeds.safetensors", {"<new1>": vecs})
    ours, theirs = load_sd(tiny["dir"]), load_sd(tiny["dir"])
    assert load_embeddings(ours, path) == ["<new1>"]
    theirs.load_textual_inversion(str(path))
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()
    prompt = "a photo of <new1> on a beach"
    # diffusers widens a multi-vector token inside the prompt; expand_prompt must do exactly the same.
    assert expand_prompt(prompt, {"<new1>": num_vectors}) == theirs.maybe_convert_prompt(prompt, theirs.tokenizer)
    ours_out = encode(ours, expand_prompt(prompt, {"<new1>": num_vectors}))
    theirs_out = encode(theirs, theirs.maybe_convert_prompt(prompt, theirs.tokenizer))
    assert torch.equal(ours_out, theirs_out)
    ids = ours.tokenizer.convert_tokens_to_ids(["<new1>"] + [f"<new1>_{i}" for i in range(1, num_vectors)])
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight[ids], vecs)


def test_other_embedding_formats(tmp_path):
    v = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": v}}, tmp_path / "orig.pt")
    assert torch.equal(read_embeddings(tmp_path / "orig.pt")["<orig>"], v)
    assert list(read_embeddings(tmp_path / "orig.pt", token="<cat>")) == ["<cat>"]
    torch.save({"string_to_param": {"*": v}, "name": "corgi"}, tmp_path / "a1111.pt")
    assert list(read_embeddings(tmp_path / "a1111.pt")) == ["corgi"]
    torch.save({"<dog>": v[0]}, tmp_path / "learned_embeds.bin")
    assert read_embeddings(tmp_path / "learned_embeds.bin")["<dog>"].shape == (1, 32)
    torch.save(v, tmp_path / "bare.pt")
    assert torch.equal(read_embeddings(tmp_path / "bare.pt", token="<x>")["<x>"], v)
    torch.save({"weird": [1, 2]}, tmp_path / "weird.pt")
    with pytest.raises(DifflabError, match="unknown embedding format"):
        read_embeddings(tmp_path / "weird.pt")


def test_embedding_errors(tiny, tmp_path):
    pipe = load_sd(tiny["dir"])
    save_embeddings(tmp_path / "dog.safetensors", {"dog": torch.zeros(1, 32)})
    with pytest.raises(DifflabError, match="'dog' is already in the tokenizer vocabulary"):
        load_embeddings(pipe, tmp_path / "dog.safetensors")
    save_embeddings(tmp_path / "wide.safetensors", {"<w>": torch.zeros(1, 768)})
    with pytest.raises(DifflabError, match="width 768, the text encoder expects 32"):
        load_embeddings(pipe, tmp_path / "wide.safetensors")
    with pytest.raises(DifflabError, match="embedding file not found"):
        load_embeddings(pipe, tmp_path / "missing.safetensors")
    assert len(pipe.tokenizer) == 49408  # nothing was added by the failed calls


# ---- input.json ---------------------------------------------------------------------------------------------

GOOD = {
    "0": {
        "src_image": "dog",
        "token_name": "<new1>",
        "prompt": ["A <new1> on a beach.", "A <new1> in snow."],
        "prompt_4_clip_eval": ["A dog on a beach.", "A dog in snow."],
        "baseline": [[79, 34], [74, 35]],
    },
    "1": {
        "src_image": "David Revoy",
        "token_name": "<new2>",
        "prompt": ["A lighthouse in the style of <new2>."],
        "prompt_4_clip_eval": ["A lighthouse in the style of David Revoy."],
        "baseline": [[70, 30]],
    },
}


def write_json(tmp_path, data):
    path = tmp_path / "input.json"
    path.write_text(json.dumps(data))
    return path


def test_input_json_valid(tmp_path):
    data = load_input_json(write_json(tmp_path, {"1": GOOD["1"], "0": GOOD["0"]}))
    assert list(data) == ["0", "1"] and data["0"]["baseline"][1] == [74, 35]


@pytest.mark.parametrize("field", ["src_image", "token_name", "prompt", "prompt_4_clip_eval", "baseline"])
def test_input_json_missing_field(tmp_path, field):
    data = json.loads(json.dumps(GOOD))
    del data["1"][field]
    with pytest.raises(DifflabError, match=f"concept '1': missing field '{field}'"):
        load_input_json(write_json(tmp_path, data))


def test_input_json_bad_lengths(tmp_path):
    data = json.loads(json.dumps(GOOD))
    data["0"]["prompt_4_clip_eval"] = data["0"]["prompt_4_clip_eval"][:1]
    with pytest.raises(DifflabError, match="'prompt_4_clip_eval' has 1 entries, 'prompt' has 2"):
        load_input_json(write_json(tmp_path, data))
    data = json.loads(json.dumps(GOOD))
    data["1"]["baseline"] = [[70]]
    with pytest.raises(DifflabError, match="not an \\[image_score, text_score\\] pair"):
        load_input_json(write_json(tmp_path, data))


@pytest.mark.parametrize("score", ["NaN", "true"])
def test_input_json_baseline_must_be_finite_numbers(tmp_path, score):
    data = json.loads(json.dumps(GOOD))
    data["1"]["baseline"] = [[70, 30]]
    path = write_json(tmp_path, data)
    path.write_text(path.read_text().replace("[70, 30]", f"[70, {score}]"))
    with pytest.raises(DifflabError, match="not an \\[image_score, text_score\\] pair"):
        load_input_json(path)
