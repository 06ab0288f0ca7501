"""The errors a user can fix: the CLI prints their message (which names the fix) and exits 2."""
from beam_curator.options import OptionError
from beam_curator.transforms.read import ShardListError


def _model_dir_error():
    from beam_curator.models import ModelDirError

    return ModelDirError


USER_ERRORS = (OptionError, ShardListError, _model_dir_error(), FileExistsError)
