"""Tests of the model plug-ins (MODEL, models/) and of run folders that survive new constants."""

import csv

import numpy as np
import pytest

import checkpoints
import configuration
import Main
import models
import Server_side
from conftest import assert_refused, write_config

# Weights as their papers count them at 28x28x1 and 10 classes (McMahan et al. 2017: 1,663,370
# for the CNN; the 2NN: 784*200 + 200 + 200*200 + 200 + 200*10 + 10).
PAPER_WEIGHTS = {"seed_cnn": 34826, "mcmahan_cnn": 1663370, "mcmahan_2nn": 199210,
                 "niid_bench_cnn": 44426, "pflib_fedavgcnn": 582026}


@pytest.mark.parametrize("name", models.NAMES)
def test_every_model_declares_a_paper_a_head_and_a_trainable_softmax_classifier(name):
    model = Server_side.create_model(name)
    module = models.get(name)
    assert module.PAPER and module.HEAD_LAYERS >= 1
    assert len(model.weights) == len(model.trainable_variables)  # one compiled training path
    assert model.output_shape == (None, 10)
    assert model.count_params() == PAPER_WEIGHTS[name]
    # The head is the softmax layer: its kernel and bias are the last HEAD_LAYERS arrays.
    head = [variable.shape for variable in model.layers[-1].weights]
    assert [variable.shape for variable in model.weights[-module.HEAD_LAYERS:]] == head
    images = np.random.default_rng(0).random((3, 28, 28, 1), np.float32)
    np.testing.assert_allclose(model(images).numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_every_model_file_is_listed_and_the_default_is_the_seeds_cnn():
    assert set(models.NAMES) == set(PAPER_WEIGHTS)
    assert Main.MODEL == models.DEFAULT == "seed_cnn"


def test_a_bad_model_is_refused_with_the_models_there_are(tmp_path, capsys):
    assert_refused(tmp_path, capsys, "MODEL must be one of mcmahan_2nn, mcmahan_cnn, "
                   "niid_bench_cnn, pflib_fedavgcnn, seed_cnn, got 'resnet'", MODEL="resnet")


def test_a_new_constant_at_its_value_of_before_keeps_every_run_folder_and_resume():
    """MODEL came after runs were named by a hash of every constant: at the seed's CNN the
    default run keeps the folder it had before (2026-12-04), and a checkpoint saved without
    MODEL resumes; another model is another run."""
    config = Main.default_config()
    before = {name: value for name, value in config.items() if name != "MODEL"}
    assert configuration.run_dir(config).name == "fedavg_noniid_ib_K100_C0.3_E1_B32_s0_e9929fee"
    assert configuration.run_dir(config) == configuration.run_dir({**before, "MODEL": "seed_cnn"})
    assert configuration.run_dir({**config, "MODEL": "mcmahan_2nn"}) != configuration.run_dir(
        config)
    assert checkpoints.config_differences(before, config, checkpoints.RESUMABLE_CHANGES) == []
    assert checkpoints.config_differences(before, {**config, "MODEL": "mcmahan_2nn"},
                                          checkpoints.RESUMABLE_CHANGES) == ["MODEL"]


@pytest.mark.slow
@pytest.mark.parametrize("name, personalization", [
    ("mcmahan_2nn", "fedper"), ("niid_bench_cnn", "none"), ("pflib_fedavgcnn", "fedrep"),
    ("mcmahan_cnn", "none")])
def test_each_model_learns_in_a_short_run_and_fedper_keeps_its_head(tmp_path,
                                                                     tenth_of_the_data, name,
                                                                     personalization):
    """Two rounds of 5 clients on a tenth of the data: well above chance (0.1), and with
    FedPer/FedRep the global model's head never moves (the clients keep theirs)."""
    path = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "out", MODEL=name,
                        NUM_CLIENTS=5, CLIENT_FRACTION=1.0, DISTRIBUTION="iid", ROUNDS=2,
                        LEARNING_RATE=0.05, LOCAL_TEST_SHARE=0.2,
                        PERSONALIZATION=personalization)
    assert Main.main(["-c", "-f", str(path)]) == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    with open(run_dir / "history.csv") as file:
        last = list(csv.DictReader(file))[-1]
    assert float(last["personal_pooled"]) > 0.5, last
    arrays, _ = checkpoints.load_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME)
    initial = Main.build_federation(
        {**Main.default_config(), "MODEL": name, "NUM_CLIENTS": 5, "DISTRIBUTION": "iid",
         "LOCAL_TEST_SHARE": 0.2, "PERSONALIZATION": personalization}, tenth_of_the_data,
        [np.arange(index, 6000, 5) for index in range(5)]).global_model.get_weights()
    head = len(initial) - models.head_layers(name)
    for index, layer in enumerate(initial):
        unchanged = np.array_equal(arrays[f"global_{index}"], layer)
        assert unchanged == (personalization != "none" and index >= head), (index, name)
