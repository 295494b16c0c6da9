"""docker/grafana/rle-serving.json: a Grafana dashboard that reads only series our exporter
renders (checked as the docs' and the scaling recipes' PromQL is, in test_deploy), and whose
quantiles are taken over summed bucket rates, so they hold across replicas."""

from __future__ import annotations

import json
import re

from ..conftest import ROOT
from .test_deploy import exposed_series

BOARD = json.loads((ROOT / "docker/grafana/rle-serving.json").read_text())
QUERIES = [t["expr"] for p in BOARD["panels"] for t in p["targets"]]
SERIES = re.compile(r"\b((?:nv_inference|rle_serving)_\w+)\b")  # as test_deploy reads the docs'


def test_every_panel_queries_series_the_server_exposes():
    assert all(p["targets"] for p in BOARD["panels"])
    named = {n for q in QUERIES for n in SERIES.findall(q)}
    assert {"nv_inference_count", "nv_inference_pending_request_count", "rle_serving_queue_duration_seconds_bucket",
            "rle_serving_compute_infer_duration_seconds_bucket", "nv_inference_request_failure",
            "rle_serving_camera_streams", "rle_serving_stream_errors_total", "rle_serving_sink_messages_total"} <= named
    assert named <= exposed_series(), named - exposed_series()


def test_every_query_is_well_formed_and_quantiles_sum_buckets():
    for query in QUERIES:
        assert query.count("(") == query.count(")") and query.count("{") == query.count("}"), query
        assert SERIES.search(query), query
        if "histogram_quantile" in query:  # by le, over a rate of the buckets
            assert re.search(r"sum by \((?:\w+, )*le\) \(rate\(\w+_bucket\[", query), query


def test_the_board_imports_with_its_own_datasource_variable():
    assert BOARD["uid"] == "rle-serving" and BOARD["title"]
    (variable,) = BOARD["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in BOARD["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
