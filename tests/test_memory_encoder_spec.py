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


def test_agreed_keeps_every_field_and_compares_every_shard_with_every_other():
    from memory.encoder_spec import agreed

    sized = EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64)
    pre = EncoderSpec("efficientnet-lite0", preprocessing="rgb (x - 127) / 128")
    assert agreed([("a", sized), ("b", None), ("c", pre)]) == LITE0  # fields from several shards, none missing
    assert agreed([("a", None)]) is None and agreed([]) is None
    # Two shards that each agree with the best described one, but not with each other.
    other = EncoderSpec("efficientnet-lite0", preprocessing="rgb x / 255")
    with pytest.raises(ValueError, match=r"different encoders: encoders differ in preprocessing: "
                                         r"efficientnet-lite0 \(preprocessing=rgb \(x - 127\) / 128\) vs "
                                         r"efficientnet-lite0 \(preprocessing=rgb x / 255\) "
                                         r"\(b.parquet vs c.parquet\)"):
        agreed([("a.parquet", sized), ("b.parquet", pre), ("c.parquet", other)])


def test_against_a_memory_names_both_sides():
    from memory.encoder_spec import check_against_memory

    check_against_memory(LITE0.to_manifest(), EncoderSpec("efficientnet-lite0", image_size=64), memory="m",
                         inputs_what="queries q")
    check_against_memory({}, EncoderSpec("x"), memory="m", inputs_what="queries q")  # unknown passes
    check_against_memory(LITE0.to_manifest(), None, memory="m", inputs_what="queries q")
    for other, field in ((EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 96), "image_size"),
                         (EncoderSpec("efficientnet-lite0", preprocessing="rgb x / 255"), "preprocessing"),
                         (EncoderSpec("efficientnet-lite0", "imagenet-0.2.0"), "version"),
                         (EncoderSpec("dinov2-vits14"), "name")):
        with pytest.raises(ValueError, match=rf"queries q do not match memory m \(the memory's encoder first, "
                                             rf"theirs second\): encoders differ in {field}: efficientnet-lite0 "
                                             rf"\(.*\) vs {other.name}"):
            check_against_memory(LITE0.to_manifest(), other, memory="m", inputs_what="queries q")


def test_unreadable_image_size_in_shard_metadata_is_named():
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 'big'"):
        EncoderSpec.from_metadata({"encoder": "e", "image_size": "big"})
