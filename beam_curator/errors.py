"""The errors a user can fix: the CLI prints their message (which names the fix) and exits 2."""
from beam_curator.models import ModelDirError
from beam_curator.options import OptionError
from beam_curator.transforms.read import ShardListError

USER_ERRORS = (OptionError, ShardListError, ModelDirError, FileExistsError)
