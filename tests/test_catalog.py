"""The price catalog: shipped files, which file wins, the price-source parsers, and
`geotrain catalog refresh` end to end against a local HTTP server speaking each format."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from geotrain import catalog
from geotrain.catalog import refresh
from providers.aws import catalog as aws_prices
from providers.azure import catalog as azure_prices
from tests.helpers import geotrain_cmd, geotrain_home  # noqa: F401

pytestmark = pytest.mark.timeout(60)

REQUIRED = {
    "aws": {"p4d.24xlarge", "p5.48xlarge", "g5.xlarge", "g5.12xlarge", "g5.48xlarge", "g6.xlarge",
            "p3.2xlarge"},
    "gcp": {"a2-highgpu-1g", "a2-highgpu-8g", "a3-highgpu-8g", "g2-standard-4", "g2-standard-48"},
    "azure": {"Standard_NC24ads_A100_v4", "Standard_ND96asr_v4", "Standard_ND96isr_H100_v5",
              "Standard_NC4as_T4_v3"},
}


@pytest.mark.parametrize("provider", catalog.CLOUDS)
def test_shipped_catalogs_cover_the_common_gpu_types(provider, geotrain_home):
    c = catalog.load(provider)
    assert c.shipped and c.path.endswith(f"geotrain/catalog/{provider}.json")
    assert set(c.instances) >= REQUIRED[provider]
    assert c.retrieved and c.source and all(u.startswith("https://") for u in c.source)
    assert "list prices" in c.note.lower() and "geotrain catalog refresh" in c.note
    for it in c.instances.values():
        assert it.gpu in catalog.GPU_TFLOPS and it.gpus >= 1 and it.gpu_memory_gib > 0
        assert it.vcpus > 0 and it.memory_gib > 0 and len(it.regions) >= 2
        for p in it.regions.values():
            assert p.on_demand > 0 and (p.spot is None or 0 < p.spot < p.on_demand)
    assert 0 < c.egress_usd_per_gb("nowhere") == c.internet_egress["default"]
    assert 0 < c.interregion_egress < c.internet_egress["default"]
    # The file form round-trips.
    assert catalog.parse(catalog.to_json(c), c.path, True) == c


def test_refreshed_file_wins_and_local_is_free_by_default(geotrain_home):
    assert catalog.load("local").price("local", "local", False) == 0.0
    shipped = catalog.load("aws")
    mine = catalog.user_dir(geotrain_home) / "aws.json"
    mine.parent.mkdir(parents=True)
    data = catalog.to_json(shipped)
    data["retrieved"] = "2030-01-01"
    data["instances"]["g5.xlarge"]["regions"]["us-east-1"]["on_demand"] = 9.99
    mine.write_text(json.dumps(data))
    c = catalog.load("aws")
    assert (c.path, c.shipped, c.retrieved) == (str(mine), False, "2030-01-01")
    assert c.price("us-east-1", "g5.xlarge", False) == 9.99
    assert c.price("us-east-1", "g5.xlarge", True) == shipped.price("us-east-1", "g5.xlarge", True)
    assert c.price("mars-1", "g5.xlarge", False) is None and c.price("us-east-1", "x", False) is None
    rows = {r["provider"]: r for r in catalog.summary()}
    assert rows["aws"]["file"] == str(mine) and not rows["aws"]["shipped"]
    assert rows["gcp"]["shipped"] and rows["gcp"]["retrieved"] == catalog.load("gcp").retrieved


def test_malformed_catalog_is_a_clear_error(geotrain_home):
    mine = catalog.user_dir(geotrain_home) / "azure.json"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"instances": {}}')
    with pytest.raises(catalog.CatalogError, match=r"azure\.json is malformed .*provider"):
        catalog.load("azure")
    mine.write_text("{not json")
    with pytest.raises(catalog.CatalogError, match="cannot be read"):
        catalog.load("azure")


def test_matching_is_cheapest_first():
    c = catalog.load("aws")
    offers = c.matching("a100", 8, spot=True)
    assert [t for _, t, _ in offers] == ["p4d.24xlarge"] * 3
    assert offers[0][0] == min(p for p, _, _ in offers)
    assert c.matching("A100", 8, spot=False, region="us-east-1") == [(32.7726, "p4d.24xlarge", "us-east-1")]
    assert c.matching("A100", 3, spot=False) == []


# -- the price sources, in their documented formats ----------------------------------------

def aws_offer(region: str, prices: dict[str, float]) -> dict:
    """A region's EC2 offer file with one Linux shared SKU per type, plus decoys that
    must be ignored (Windows, dedicated, reserved capacity, an unused type)."""
    products, on_demand = {}, {}
    rows = [(t, "Linux", "Shared", "Used", p) for t, p in prices.items()]
    rows += [(t, "Windows", "Shared", "Used", 99.0) for t in prices]
    rows += [(t, "Linux", "Dedicated", "Used", 98.0) for t in prices]
    rows += [(t, "Linux", "Shared", "UnusedCapacityReservation", 97.0) for t in prices]
    rows += [("m5.large", "Linux", "Shared", "Used", 0.096)]
    for i, (itype, os_, tenancy, capacity, price) in enumerate(rows):
        sku = f"SKU{region}{i}"
        products[sku] = {"sku": sku, "productFamily": "Compute Instance", "attributes": {
            "instanceType": itype, "regionCode": region, "operatingSystem": os_,
            "tenancy": tenancy, "preInstalledSw": "NA", "capacitystatus": capacity,
            "operation": "RunInstances", "vcpu": "48", "memory": "192 GiB", "gpu": "4"}}
        on_demand[sku] = {f"{sku}.JRTCKXETXF": {"offerTermCode": "JRTCKXETXF", "priceDimensions": {
            f"{sku}.JRTCKXETXF.6YS6EN2CT7": {"unit": "Hrs", "pricePerUnit": {"USD": f"{price:.10f}"}}}}}
    return {"formatVersion": "v1.0", "offerCode": "AmazonEC2", "products": products,
            "terms": {"OnDemand": on_demand}}


SPOT_JS = "callback(" + json.dumps({"vers": 0.01, "config": {"rate": "perhr", "regions": [
    {"region": "us-east", "instanceTypes": [{"type": "gpu", "sizes": [
        {"size": "g5.12xlarge", "valueColumns": [{"name": "linux", "prices": {"USD": "1.7500"}},
                                                 {"name": "mswin", "prices": {"USD": "3.0"}}]},
        {"size": "p3.2xlarge", "valueColumns": [{"name": "linux", "prices": {"USD": "N/A*"}}]}]}]},
    {"region": "us-west-2", "instanceTypes": [{"type": "gpu", "sizes": [
        {"size": "g5.12xlarge", "valueColumns": [{"name": "linux", "prices": {"USD": "1.9"}}]},
        {"size": "m5.large", "valueColumns": [{"name": "linux", "prices": {"USD": "0.03"}}]}]}]},
]}}) + ");"


def azure_item(region: str, sku: str, price: float, kind: str = "", product: str = "") -> dict:
    name = sku.removeprefix("Standard_").replace("_", " ")
    return {"currencyCode": "USD", "retailPrice": price, "unitPrice": price,
            "armRegionName": region, "location": region, "effectiveStartDate": "2025-01-01T00:00:00Z",
            "meterName": f"{name}{kind}", "productName": product or "Virtual Machines NCadsA100v4 Series",
            "skuName": f"{name}{kind}", "serviceName": "Virtual Machines", "armSkuName": sku,
            "unitOfMeasure": "1 Hour", "type": "Consumption", "isPrimaryMeterRegion": True}


AZURE_ITEMS = [
    azure_item("eastus", "Standard_NC24ads_A100_v4", 3.5),
    azure_item("eastus", "Standard_NC24ads_A100_v4", 1.2, " Spot"),
    azure_item("eastus", "Standard_NC24ads_A100_v4", 0.7, " Low Priority"),
    azure_item("eastus", "Standard_NC24ads_A100_v4", 4.9, "", "Virtual Machines NCadsA100v4 Series Windows"),
    azure_item("westus3", "Standard_NC4as_T4_v3", 0.5),
    azure_item("westus3", "Standard_NC4as_T4_v3", 0.2, " Spot"),
    azure_item("japaneast", "Standard_ND96asr_v4", 30.0),
]


def test_parse_aws_offer_keeps_linux_shared_on_demand_only():
    got = aws_prices.parse_aws_offer(aws_offer("us-east-1", {"g5.12xlarge": 5.5}), {"g5.12xlarge"})
    assert got == {"g5.12xlarge": {"on_demand": 5.5, "vcpus": 48.0, "memory_gib": 192.0, "gpus": 4.0}}


def test_parse_aws_spot_maps_old_region_names_and_skips_na():
    got = aws_prices.parse_aws_spot(SPOT_JS)
    assert got[("us-east-1", "g5.12xlarge")] == 1.75 and got[("us-west-2", "g5.12xlarge")] == 1.9
    assert ("us-east-1", "p3.2xlarge") not in got
    assert aws_prices.parse_aws_spot(SPOT_JS[len("callback("):-2]) == got  # plain JSON too


def test_parse_azure_items_splits_spot_and_skips_windows_and_low_priority():
    got = azure_prices.parse_azure_items(AZURE_ITEMS)
    assert got[("eastus", "Standard_NC24ads_A100_v4")] == catalog.Price(3.5, 1.2)
    assert got[("westus3", "Standard_NC4as_T4_v3")] == catalog.Price(0.5, 0.2)
    assert got[("japaneast", "Standard_ND96asr_v4")] == catalog.Price(30.0, None)


class PriceServer(ThreadingHTTPServer):
    """Serves the AWS bulk offer files, spot.js and the Azure Retail Prices API (two
    pages) on 127.0.0.1; records every request."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[str] = []
        self.offers = {"us-east-1": aws_offer("us-east-1", {"g5.12xlarge": 5.5, "p4d.24xlarge": 30.0}),
                       "us-west-2": aws_offer("us-west-2", {"g5.12xlarge": 5.6})}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: PriceServer = self.server
        srv.requests.append(self.path)
        url = urlparse(self.path)
        if url.path == "/offers/v1.0/aws/AmazonEC2/current/region_index.json":
            body = {"formatVersion": "v1.0", "regions": {
                r: {"regionCode": r, "currentVersionUrl": f"/offers/v1.0/aws/AmazonEC2/20250601/{r}/index.json"}
                for r in srv.offers}}
        elif url.path.startswith("/offers/v1.0/aws/AmazonEC2/20250601/"):
            body = srv.offers[url.path.split("/")[-2]]
        elif url.path == "/spot.js":
            return self._send(SPOT_JS.encode(), "application/javascript")
        elif url.path == "/api/retail/prices":
            q = parse_qs(url.query)
            flt = q["$filter"][0]
            assert "serviceName eq 'Virtual Machines'" in flt and "armSkuName eq 'Standard_NC4as_T4_v3'" in flt
            skip = int(q.get("$skip", ["0"])[0])
            page = AZURE_ITEMS[skip:skip + 4]
            nxt = (f"{srv.url}/api/retail/prices?{url.query}&$skip={skip + 4}"
                   if skip + 4 < len(AZURE_ITEMS) else None)
            body = {"BillingCurrency": "USD", "CustomerEntityId": "Default", "Items": page,
                    "NextPageLink": nxt, "Count": len(page)}
        else:
            self.send_error(404)
            return
        self._send(json.dumps(body).encode(), "application/json")

    def _send(self, body: bytes, kind: str):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def price_server():
    srv = PriceServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def price_env(srv: PriceServer) -> dict[str, str]:
    return {"GEOTRAIN_AWS_PRICING_URL": srv.url, "GEOTRAIN_AWS_SPOT_URL": f"{srv.url}/spot.js",
            "GEOTRAIN_AZURE_PRICES_URL": f"{srv.url}/api/retail/prices", "NO_PROXY": "127.0.0.1"}


def test_refresh_end_to_end(price_server: PriceServer, geotrain_home: Path):
    env = dict(os.environ, GEOTRAIN_HOME=str(geotrain_home), COLUMNS="200", **price_env(price_server))
    p = subprocess.run(geotrain_cmd("catalog", "refresh", "--json"), capture_output=True, text=True,
                       env=env, timeout=50)
    assert p.returncode == 0, p.stderr
    results = {r["provider"]: r for r in json.loads(p.stdout)}
    assert results["aws"]["refreshed"] and results["azure"]["refreshed"]
    assert not results["gcp"]["refreshed"] and "API key" in results["gcp"]["detail"]
    assert results["gcp"]["path"].endswith("geotrain/catalog/gcp.json")
    assert any("from $GEOTRAIN_AWS_PRICING_URL" in u for u in results["aws"]["urls"])

    aws = json.loads((geotrain_home / "catalog/aws.json").read_text())
    g5 = aws["instances"]["g5.12xlarge"]["regions"]
    assert g5 == {"us-east-1": {"on_demand": 5.5, "spot": 1.75}, "us-west-2": {"on_demand": 5.6, "spot": 1.9}}
    assert aws["instances"]["p4d.24xlarge"]["regions"] == {"us-east-1": {"on_demand": 30.0, "spot": None}}
    assert aws["instances"]["p5.48xlarge"]["regions"] == {}  # not in the fetched documents
    assert aws["source"][0].startswith(price_server.url) and aws["egress"] == catalog.to_json(catalog.load("aws", Path("/nonexistent")))["egress"]
    # Only the catalog's own regions were fetched (eu-west-1 is not in the index; us-east-2 neither).
    offers = [r for r in price_server.requests if r.startswith("/offers/v1.0/aws/AmazonEC2/2025")]
    assert sorted(offers) == ["/offers/v1.0/aws/AmazonEC2/20250601/us-east-1/index.json",
                              "/offers/v1.0/aws/AmazonEC2/20250601/us-west-2/index.json"]
    azure = json.loads((geotrain_home / "catalog/azure.json").read_text())
    assert azure["instances"]["Standard_NC24ads_A100_v4"]["regions"] == {"eastus": {"on_demand": 3.5, "spot": 1.2}}
    assert len([r for r in price_server.requests if r.startswith("/api/retail/prices")]) == 2  # paged

    # `catalog show` now says the refreshed files are used, and plan uses their prices.
    show = json.loads(subprocess.run(geotrain_cmd("catalog", "show", "--json"), capture_output=True,
                                     text=True, env=env, check=True).stdout)
    rows = {r["provider"]: r for r in show}
    assert rows["aws"]["file"] == str(geotrain_home / "catalog/aws.json") and not rows["aws"]["shipped"]
    assert rows["gcp"]["shipped"]
    text = subprocess.run(geotrain_cmd("catalog", "refresh", "--provider", "gcp"), capture_output=True,
                          text=True, env=env, check=True).stdout
    assert "needs a project's API key" in text and "keeping the shipped gcp.json" in text


def test_refresh_failure_is_reported_and_keeps_the_catalog(geotrain_home: Path, monkeypatch):
    monkeypatch.setenv("GEOTRAIN_AZURE_PRICES_URL", "http://127.0.0.1:9/nothing")
    [r] = refresh.refresh("azure")
    assert not r.refreshed and "refresh failed" in r.detail and "cannot fetch" in r.detail
    assert not (geotrain_home / "catalog/azure.json").exists()
    assert catalog.load("azure").shipped
    with pytest.raises(catalog.CatalogError, match="unknown provider 'ibm'"):
        refresh.refresh("ibm")
