"""CPU threads per training process: from free cores and local processes, overridable."""
import pytest

from radio_core.train.threads import auto_threads, choose_threads, local_process_count


@pytest.mark.parametrize("cores, local, load, expected", [
    (2, 1, 0.3, 2),     # idle: every core
    (2, 1, 6.7, 1),     # loaded 2-core machine: one thread, not two fighting the others
    (16, 8, 8.5, 2),    # 8 local ranks, nothing else running: 2 each
    (16, 2, 0.0, 8),
    (16, 4, 12.0, 2),   # 8 cores busy elsewhere: the free 8 shared by 4 ranks
    (1, 4, 0.0, 1),     # never fewer than one
])
def test_auto_threads(cores, local, load, expected):
    assert auto_threads(cores, local, load) == expected


def test_recipe_then_environment_override_the_choice(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(5, 1) == (5, "train.cpu_threads")
    assert choose_threads(None, 1) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = choose_threads(None, 2)
    assert n >= 1 and "local process(es)" in why and "train.cpu_threads overrides" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_process_count(8) == 4


def test_recipe_field_is_validated(tmp_path):
    from radio_core.recipe import RecipeError, load_recipe

    from helpers import tiny_recipe

    path = tiny_recipe(tmp_path)
    assert load_recipe(path, ["train.cpu_threads=2"]).train.cpu_threads == 2
    with pytest.raises(RecipeError, match="train.cpu_threads"):
        load_recipe(path, ["train.cpu_threads=0"])
