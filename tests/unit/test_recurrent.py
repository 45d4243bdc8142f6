"""The block-recurrent cell's parts: sizes, gates, topologies, initial state (docs/models.md#block-recurrent-transformer, docs/models.md#identity-tests)."""

import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.layers.gates import FixedGate, LSTMGate, build_gate, build_update
from lrexp.layers.recurrent import RecurrentLayer
from lrexp.model.lm import build_model
from lrexp.model.state import ModelState, RecurrentState

GATES = ("lstm", "fixed")
TOPOLOGIES = ("dual", "single", "skip")
ROWS = [f"rec_{g}_{t}" for g in GATES for t in TOPOLOGIES]
# docs/models.md#parameters: non-embedding parameters at paper scale, in millions
PAPER_PARAMS = {
    "rec_fixed_skip": 160.4, "rec_fixed_dual": 168.8, "rec_fixed_single": 170.9,
    "rec_lstm_skip": 164.6, "rec_lstm_dual": 181.4, "rec_lstm_single": 179.3,
}


def _cell(row, *overrides, seed=0):
    cfg = load(overrides=["scale=smoke", f"row={row}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg, 64).eval()
    (index,) = cfg.derived.recurrent_layers
    return model, model.layers[index], cfg


@pytest.mark.parametrize("row", ROWS)
def test_paper_scale_parameter_count_matches_the_spec_table(row):
    cfg = load(overrides=["scale=paper", f"row={row}"])
    with torch.device("meta"):
        model = build_model(cfg, 32128)
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed."))
    assert n / 1e6 == pytest.approx(PAPER_PARAMS[row], rel=0.01)
    assert [type(layer).__name__ for layer in model.layers].count("RecurrentLayer") == 1
    assert isinstance(model.layers[9], RecurrentLayer)  # layer 10 of 12


@pytest.mark.parametrize("row", ROWS)
def test_fixed_gates_read_no_input_and_skip_has_no_state_ffn(row):
    _, cell, cfg = _cell(row)
    gates = [m for m in cell.update.modules() if isinstance(m, (FixedGate, LSTMGate))]
    assert len(gates) == (2 if cfg.model.recurrent.topology == "dual" else 1)
    for gate in gates:
        if cfg.model.recurrent.gate == "fixed":
            assert isinstance(gate, FixedGate)
            assert all(p.dim() == 1 for p in gate.parameters())  # one bias per channel, no kernel
            h1, h2 = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
            assert all(torch.equal(a, b) for a, b in zip(gate.coefficients(h1), gate.coefficients(h2)))
        else:
            assert isinstance(gate, LSTMGate) and gate.w_f.weight.dim() == 2
    names = {n.split(".")[0] for n, _ in cell.update.named_parameters()}
    ffn = {"w_1", "w_2"} & names
    assert (not ffn) == (cfg.model.recurrent.topology == "skip")


@pytest.mark.parametrize("row", ROWS)
def test_a_gate_that_keeps_the_old_state_holds_it_constant_across_blocks(row):
    _, cell, cfg = _cell(row)
    with torch.no_grad():
        for gate in (m for m in cell.update.modules() if isinstance(m, (FixedGate, LSTMGate))):
            if isinstance(gate, FixedGate):
                gate.bias.fill_(200.0)  # g = 1: c' = c + 0 * z
            else:
                gate.w_f.weight.zero_(), gate.w_i.weight.zero_()
                gate.b_f.fill_(200.0), gate.b_i.fill_(-200.0)  # f = 1, i = 0
        x = torch.randn(2, cfg.derived.segment_len, cfg.model.d_model)  # 8 blocks
        _, new = cell(x, cell.initial_state(2, "cpu"))
        torch.testing.assert_close(new.c, cell.c_init.expand(2, -1, -1), rtol=0, atol=0)
        gate.bias.fill_(0.0) if isinstance(gate, FixedGate) else gate.b_f.fill_(0.0)
        _, moved = cell(x, cell.initial_state(2, "cpu"))
        assert not torch.allclose(moved.c, cell.c_init.expand(2, -1, -1))


def test_gates_at_init_are_near_their_paper_values():
    torch.manual_seed(0)
    h = torch.randn(4, 64, 256)  # u-like inputs of unit scale
    keep, write = build_gate("fixed", 256, 128).coefficients(h)
    assert keep.min() > 0.4 and keep.max() < 0.6 and torch.allclose(keep + write, torch.ones(()))
    forget, inp = build_gate("lstm", 256, 128).coefficients(h)
    for coefficient, paper in ((forget, 0.73), (inp, 0.27)):
        channel_means = coefficient.mean(dim=(0, 1))  # [d]
        assert abs(channel_means.mean().item() - paper) < 0.05
        assert channel_means.sub(paper).abs().max() < 0.1  # the N(0, 0.1^2) biases spread channels a little


def test_single_squashes_its_candidate_and_candidate_tanh_squashes_the_others():
    torch.manual_seed(0)
    c, u = torch.zeros(1, 4, 8), 100 * torch.randn(1, 4, 16)
    for topology, tanh in (("single", False), ("skip", True), ("dual", True)):
        update = build_update(topology, "fixed", 8, 32, candidate_tanh=tanh)
        for gate in (m for m in update.modules() if isinstance(m, FixedGate)):
            gate.bias.data.fill_(-200.0)  # g = 0: c' = z, the candidate itself
        assert update(c, u).abs().max() <= 1.0
    plain = build_update("skip", "fixed", 8, 32, candidate_tanh=False)
    plain.gate.bias.data.fill_(-200.0)
    assert plain(c, u).abs().max() > 1.0


def test_a_document_start_gives_that_lane_the_learned_initial_state_only():
    _, cell, cfg = _cell("rec_fixed_skip")
    s, d = cfg.model.recurrent.num_states, cfg.model.d_model
    carried = RecurrentState.initial(cell.initial_state(3, "cpu"), s, d)
    carried = RecurrentState(fresh=torch.zeros(3, dtype=torch.bool), k=carried.k, v=carried.v, c=torch.randn(3, s, d))
    start = cell.begin_segment(carried.reset_rows(torch.tensor([False, True, False]))).c
    torch.testing.assert_close(start[1], cell.c_init.detach())
    torch.testing.assert_close(start[[0, 2]], carried.c[[0, 2]])
    cleared = RecurrentLayer.begin_segment(_cell("rec_fixed_skip", "model.recurrent.always_clear_state=true")[1], carried).c
    assert all(torch.equal(cleared[i], cell.c_init.detach()) for i in range(3))


def test_initial_state_and_state_ids_are_initialised_as_the_spec_says():
    _, cell, _ = _cell("rec_fixed_skip", "scale.num_states=512", "scale.d_model=64")
    assert cell.c_init.std().item() == pytest.approx(0.1, rel=0.1)
    assert cell.state.ids.std().item() == pytest.approx(1.0, rel=0.1)
    _, no_ids, _ = _cell("rec_fixed_skip", "model.recurrent.state_ids=false")
    assert no_ids.state.ids is None


def test_the_carried_state_round_trips_through_checkpoint_tensors():
    model, _, cfg = _cell("rec_lstm_dual")
    _, state = model(torch.randint(0, 64, (2, cfg.derived.segment_len)), model.initial_state(2, "cpu"))
    back = ModelState.from_tensors(state.to_tensors())
    assert isinstance(back.layers[1], RecurrentState)
    assert all(torch.equal(a, b) for a, b in zip(state.to_tensors().values(), back.to_tensors().values()))


def test_unknown_gate_or_topology_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="gate"):
        load(overrides=["scale=smoke", "row=rec_fixed_skip", "model.recurrent.gate=sigmoid"])
    with pytest.raises(ConfigError, match="topology"):
        load(overrides=["scale=smoke", "row=rec_fixed_skip", "model.recurrent.topology=triple"])
