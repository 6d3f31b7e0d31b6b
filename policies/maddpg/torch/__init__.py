"""Torch parts of MADDPG: the RL module (actors and critics) and the learner (losses)."""
