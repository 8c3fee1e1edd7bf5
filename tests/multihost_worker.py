"""One process of the 2-process CPU test (tests/test_multihost.py): a pretraining step on a global mesh."""
import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", int(os.environ.get("LOCAL_DEVICES", "2")))

from instructgpt_jax.train import distributed  # noqa: E402

distributed.maybe_initialize()

import numpy as np  # noqa: E402

from instructgpt_jax import configs  # noqa: E402
from instructgpt_jax.data import pipeline  # noqa: E402
from instructgpt_jax.train import sharding, steps  # noqa: E402
from instructgpt_jax.train.state import make_optimizer  # noqa: E402

c = configs.base_config("pretrain", "test")
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 1
c.optim.warmup_steps = 0
mesh = sharding.make_mesh(c)
model = steps.build_model(c)
init = steps.init_state_fn(model, make_optimizer(c.optim), c.train.seq_len)
state, shardings = sharding.sharded_init(init, mesh, sharding.rules(c), jax.random.PRNGKey(0))
step = steps.make_pretrain_step(c, model, mesh, shardings)
global_tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (8, 65), 0, 512), np.int32)
rows = 8 // jax.process_count()
local = global_tokens[jax.process_index() * rows:(jax.process_index() + 1) * rows]  # this process's shard only
batch = pipeline.to_global_batch({"tokens": local}, sharding.batch_sharding(mesh))
losses = []
for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
if jax.process_index() == 0:
    json.dump({"losses": losses, "processes": jax.process_count(), "devices": jax.device_count()}, open(sys.argv[1], "w"))
