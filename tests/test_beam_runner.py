"""Beam options are checked against Beam's own option list before any pipeline is made."""
import pytest

from pipelines.beam_runner import BuildFailed, run_pipeline, validate_beam_args

OWN = ("--num-shards", "--class-names", "--partition", "--kmeans-cells", "--backend")


@pytest.mark.parametrize("args", [
    [],
    ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ["--runner", "DirectRunner", "--direct_running_mode", "in_memory", "--direct_num_workers", "2"],
    ["--runner=DataflowRunner", "--project=p", "--region=us-central1", "--temp_location=gs://b/tmp",
     "--sdk_location=container", "--max_num_workers=32", "--experiments=use_runner_v2", "--experiments", "x"],
    ["--runner=FlinkRunner", "--flink_master=HOST:8081", "--environment_type=LOOPBACK", "--parallelism=4"],
    ["--runner=SparkRunner", "--spark_master_url=spark://HOST:7077", "--save_main_session"],
])
def test_options_beam_knows_pass_unchanged_in_every_form(args):
    assert validate_beam_args(args, own_options=OWN) == args


@pytest.mark.parametrize("args, message", [
    (["--partiton", "kmeans"], "unknown option --partiton (did you mean --partition?)"),
    (["--partiton=kmeans"], "unknown option --partiton (did you mean --partition?)"),
    (["--direct_num_worker=2"], "unknown option --direct_num_worker (did you mean --direct_num_workers?)"),
    (["--runner=DirectRunner", "--num_shards", "3"], "unknown option --num_shards (did you mean --num-shards?)"),
    (["--zzzzzz"], "unknown option --zzzzzz"),
    (["--help"], "unknown option --help"),
    (["--partition", "hash"], "--partition is an option of the command, not of Beam"),
    (["kmeans"], "unexpected argument 'kmeans'"),
    (["--runner", "DirectRunner", "extra"], "unexpected argument 'extra'"),
    (["--direct_num_workers=two"], "bad Beam option: argument --direct_num_workers: invalid int value: 'two'"),
    (["--direct_running_mode=fast"], "bad Beam option: argument --direct_running_mode: invalid choice"),
    (["--save_main_session=yes"], "bad Beam option: argument --save_main_session: ignored explicit argument"),
    (["--project"], "bad Beam option: argument --project: expected one argument"),
])
def test_unknown_options_stray_words_and_bad_values_are_refused_with_the_closest_name(args, message):
    with pytest.raises(ValueError) as err:
        validate_beam_args(args, own_options=OWN)
    assert str(err.value).startswith(message)


def test_suggestions_without_own_options_come_from_beam_only():
    with pytest.raises(ValueError, match=r"^unknown option --partiton$"):
        validate_beam_args(["--partiton"])


def test_a_failed_pipeline_raises_build_failed_with_the_workers_message():
    def construct(p):
        import apache_beam as beam

        def boom(x):
            raise ValueError(f"no row {x}")

        p | beam.Create([7]) | beam.Map(boom)

    with pytest.raises(BuildFailed, match=r"^demo failed, nothing was published: .*no row 7"):
        run_pipeline(construct, ["--runner=DirectRunner", "--direct_running_mode=in_memory"], "demo")
