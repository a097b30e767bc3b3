-- wrk script: each connection waits 10 ms between requests, so N connections offer about
-- N × 100 requests/s (minus the latency itself): a fixed-rate load for latency percentiles.
function delay()
  return 10
end
