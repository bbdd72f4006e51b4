"""RolloutWorker as a plain object (no actor): weights in through a WeightReceiver, samples out."""
import pytest
import torch

from models import ModelConfig, build_model
from rollout.config import RolloutConfig
from rollout.tasks import TaskConfig

pytestmark = pytest.mark.ray


def _published(model, bump: float = 0.0):
    state = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()}
    state["wte.weight"][:3] += bump
    return state


def test_worker_generates_scores_and_swaps_offered_weights(ray_cluster):
    from rollout.worker import RolloutWorker
    from sync.config import SyncConfig
    from sync.checksum import state_checksum
    from sync.transport import WeightPublisher

    mc = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=32)
    torch.manual_seed(0)
    model, tok = build_model(mc)
    pub = WeightPublisher(SyncConfig())
    v1 = _published(model)
    pub.publish(v1, 1)
    worker = RolloutWorker(0, mc, RolloutConfig(max_new_tokens=4), TaskConfig(name="reverse", length=3))
    with pytest.raises(RuntimeError, match="no weights yet"):
        worker.generate(1, 1)
    stats = worker.apply_update(pub.update_for(None))
    assert stats.version == 1 and stats.checksum == state_checksum(v1)

    out = worker.generate(3, 2)
    assert out.version == 1 and out.tokens.shape == (6, 4) and out.logprobs.shape == (6, 4)
    assert out.prompt_ids[0] == out.prompt_ids[1]  # a group shares its prompt
    for i in range(6):  # rewards are the exact-match score of each decoded completion
        n = int(out.lengths[i])
        text = tok.decode(out.tokens[i, :n].tolist())
        prompt = tok.decode(out.prompt_ids[i][1:])
        assert out.rewards[i].item() == float(text.strip() == prompt[len("rev:"):-1][::-1])

    v2 = _published(model, bump=0.5)
    pub.publish(v2, 2)
    worker.offer_update({1: pub.update_for(1)})
    out = worker.generate(1, 2, min_version=2)  # waits for the background fetch, then swaps
    assert out.version == 2
    assert out.sync is not None and out.sync.version == 2 and out.sync.pause_s >= 0 and out.sync.fetch_s is not None
    assert out.sync.checksum == state_checksum(v2)
    assert torch.equal(worker.weights()["wte.weight"], v2["wte.weight"])

    pub.publish(_published(model, bump=1.0), 3)
    worker.offer_update({0: pub.update_for(0)})  # nothing for version 2: nothing staged
    out = worker.generate(1, 1, min_version=3, wait_timeout_s=5.0)
    assert out.version == 2 and out.sync is None
