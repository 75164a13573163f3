"""Rendering: what a run or an evaluation looks like to a person.

``rundata`` reads a run directory, ``figures``/``plots``/``trend_plots`` draw PNGs, ``html`` writes the
offline report page, ``tables`` prints the terminal tables. Nothing here measures: the numbers come
from :mod:`selfalign.eval` and the run directory.
"""
