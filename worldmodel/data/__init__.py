"""Recordings: the episode format (episode), clip datasets (dataset), the train/held-out split (splits).

Command line: ``python -m worldmodel.data collect | sheet | video | info`` (see ``--help``).
"""

from worldmodel.data.episode import Episode, EpisodeError, EpisodeFile, EpisodeMeta, EpisodeWriter, read_episode

__all__ = ["Episode", "EpisodeError", "EpisodeFile", "EpisodeMeta", "EpisodeWriter", "read_episode"]
