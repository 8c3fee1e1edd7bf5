"""Command line: `python -m instructgpt_jax.main --config=experiments/pretrain.py:size=tiny --workdir=runs/tiny`.

Any config value can be overridden: `--config.optim.lr=3e-4`. Rerunning the same command on the
same workdir resumes from its latest checkpoint. Problems with the user's input (config, data,
checkpoints) are printed as one line and exit with status 2.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file, optionally with :args.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter out; --verbosity=0 shows it
    from instructgpt_jax import stages
    from instructgpt_jax.errors import UserError
    from instructgpt_jax.stages.common import enable_compilation_cache
    from instructgpt_jax.train import distributed

    try:
        distributed.maybe_initialize()
        enable_compilation_cache()
        stages.run(FLAGS.config, FLAGS.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
