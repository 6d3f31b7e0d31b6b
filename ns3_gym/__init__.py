"""ns3_gym: the slicing env on ns-3 packets, in-process (pip ``ns3``, the ``[ns3]`` extra).

- :mod:`ns3_gym.simulator`: :class:`~ns3_gym.simulator.Ns3SlicingSimulator`, what
  ``SlicingConfig(backend="ns3")`` builds: the fast simulator with each interval played on packets
  and costs judged from the measurements;
- :mod:`ns3_gym.engine`: the ns-3 cell (``cell.h``, compiled by cppyy), one per process, a Ray
  actor for any further one.

Importing this package loads no ns-3; building an ns-3 simulator does.
"""
