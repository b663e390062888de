"""What tests, benchmarks, the demo and the conformance bench run a fleet with; no part of a
deployment.

- :mod:`maskfl.testing.broker`: a real mosquitto on a free loopback port (:class:`Mosquitto`,
  :func:`free_port`), the one way anything in maskfl starts one.
- :mod:`maskfl.testing.fleet`: a fleet CA (:class:`SimFleet`) that issues identities, draws
  them for wanted sortition roles and writes coordinator bundles.
- :mod:`maskfl.testing.participants`: simulated participants (:class:`SimParticipant`)
  that speak the PET protocol with known deltas, and :func:`expected_mean` to check the
  coordinator's result against.
- :mod:`maskfl.testing.tls`: a throwaway X.509 PKI for TLS brokers (:class:`TestPki`).

Production packages (protocol, transport, agent, broker_coordinator, aggregator_gpu) never
import it (an import contract); tools and tests do.
"""
