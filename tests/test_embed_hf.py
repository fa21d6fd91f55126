"""DINOv2 and CLIP image towers from local Hugging Face folders (nothing is downloaded): tiny checkpoints with
the real architectures are built and saved here, then loaded through ``pipelines.encoders`` and checked
against the models called directly; one of them also runs through the Ray pipeline."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from pipelines.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, encoder_image_size, load_encoder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VISMEM_MODEL_DIR", str(tmp_path / "models"))


def _normalised(images, mean, std):
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture
def tiny_dinov2(tmp_path):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       patch_size=14, image_size=56)
    model = transformers.Dinov2Model(config).eval()
    path = tmp_path / "dinov2-tiny"
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 56, "width": 56}, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}))
    return path, model


def test_dinov2_folder_gives_the_last_layer_cls_token(tiny_dinov2, tmp_path):
    path, model = tiny_dinov2
    enc = load_encoder(f"dinov2:{path}")
    assert (enc.dim, enc.image_size) == (32, 56) and encoder_image_size(f"dinov2:{path}") == 56
    imgs = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    with torch.no_grad():
        cls = model(pixel_values=_normalised(imgs, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
    np.testing.assert_allclose(enc.embed(imgs), F.normalize(cls, dim=1).numpy(), atol=1e-5)
    # A named checkpoint resolves under the model directory.
    shutil.copytree(path, tmp_path / "models" / "dinov2-vits14")
    named = load_encoder("dinov2-vits14")
    np.testing.assert_allclose(named.embed(imgs), enc.embed(imgs), atol=1e-6)
    assert named.version.startswith("dinov2-vits14:model.safetensors:")


def test_clip_folder_gives_the_projected_image_embedding(tmp_path):
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    path = tmp_path / "clip-tiny"
    model.save_pretrained(path)  # a full CLIP checkpoint, as the real ones are; only the image tower is loaded
    enc = load_encoder(f"clip:{path}")
    assert (enc.dim, enc.image_size) == (16, 32) and encoder_image_size(f"clip:{path}") == 32
    imgs = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=_normalised(imgs, CLIP_MEAN, CLIP_STD)).pooler_output
        ref = F.normalize(model.visual_projection(pooled), dim=1).numpy()
    np.testing.assert_allclose(enc.embed(imgs), ref, atol=1e-5)
    # Grayscale input is expanded to RGB, as for every encoder.
    assert enc.embed(imgs[..., 0]).shape == (4, 16)
    with pytest.raises(ValueError, match="takes 32px images"):
        load_encoder(f"clip:{path}", image_size=64)


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_encoder("clip-vit-b32")
    msg = str(exc.value)
    assert f"{tmp_path / 'models' / 'clip-vit-b32'}" in msg and "huggingface-cli download openai/clip-vit-base-patch32" in msg
    with pytest.raises(FileNotFoundError, match="no dinov2 checkpoint at /nowhere"):
        load_encoder("dinov2:/nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_encoder(f"dinov2:{tmp_path / 'half'}")


def test_dinov2_folder_through_the_ray_pipeline(tiny_dinov2, tmp_path):
    import ray

    from pipelines.embed import EmbedConfig, run_embed
    from pipelines.outputs import read_run
    from pipelines.sources import SourceSpec, fashion_mnist

    path, _ = tiny_dinov2
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        s = run_embed(EmbedConfig(SourceSpec("fashion-mnist", split="test", limit=30, shard_size=15),
                                  str(tmp_path / "out"), encoder=f"dinov2:{path}", progress=False))
    finally:
        ray.shutdown()
    assert s["encoder"]["dim"] == 32 and s["encoder"]["image_size"] == 56 and s["counts"]["embedded"] == 30
    run = read_run(str(tmp_path / "out"))
    x, _ = fashion_mnist("test")
    np.testing.assert_allclose(run["embeddings"], load_encoder(f"dinov2:{path}").embed(x[:30]), atol=1e-5)
    assert run["metadata"]["encoder"] == f"dinov2:{path}"
