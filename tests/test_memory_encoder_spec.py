"""memory.encoder_spec: one encoder description, to and from the manifest and the shard metadata."""
import pytest

from memory.encoder_spec import EncoderSpec

LITE0 = EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64, "rgb (x - 127) / 128")


def test_round_trips():
    assert LITE0.to_manifest() == {"name": "efficientnet-lite0", "version": "imagenet-0.1.0", "image_size": 64,
                                   "preprocessing": "rgb (x - 127) / 128"}
    assert EncoderSpec.from_manifest(LITE0.to_manifest()) == LITE0
    meta = LITE0.to_metadata()
    assert meta == {"encoder": "efficientnet-lite0", "encoder_version": "imagenet-0.1.0", "image_size": "64",
                    "preprocessing": "rgb (x - 127) / 128"}
    assert EncoderSpec.from_metadata({**meta, "dim": "1280", "normalisation": "l2"}) == LITE0


def test_todays_stored_forms():
    # What the Beam build records in a manifest, and what the embedding pipeline writes to shards.
    assert EncoderSpec.from_manifest({"name": "e", "version": "7"}) == EncoderSpec("e", "7")
    assert EncoderSpec.from_manifest({}) is None and EncoderSpec.from_manifest(None) is None
    meta = {"encoder": "efficientnet-lite0", "encoder_version": "imagenet-0.1.0", "image_size": "64", "teacher": ""}
    assert EncoderSpec.from_metadata(meta) == EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64)
    assert EncoderSpec.from_metadata({"dim": "4"}) is None


def test_check_compatible_names_both_sides():
    LITE0.check_compatible(EncoderSpec("efficientnet-lite0", "imagenet-0.1.0"))  # unknown fields not compared
    with pytest.raises(ValueError, match=r"differ in image_size: efficientnet-lite0 \(.*image_size=64.*\) vs "
                                         r"efficientnet-lite0 \(.*image_size=96"):
        LITE0.check_compatible(EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 96))
    with pytest.raises(ValueError, match=r"differ in name, version: .* vs dinov2-vits14 \(version=2\)"):
        LITE0.check_compatible(EncoderSpec("dinov2-vits14", "2"))


def test_bad_specs():
    with pytest.raises(ValueError, match="needs a name"):
        EncoderSpec("")
    with pytest.raises(ValueError, match="positive integer"):
        EncoderSpec("e", image_size=0)
