"""Moved to :mod:`demo.data`; this alias keeps old imports working until they are switched."""

import sys

from demo import data as _data

sys.modules[__name__] = _data
