"""Kafka plumbing: the embedded broker (Tansu), local Apache Kafka, topics, Faust/aiokafka compatibility."""
