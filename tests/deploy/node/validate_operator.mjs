// Validates Prometheus-operator resources (a JSON list on stdin) against the schemas of
// @kubernetes-models/prometheus-operator, generated from the operator's published CRDs.
// Prints one line per resource; exits 1 if any is invalid.
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const kinds = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  let failed = false;
  for (const resource of JSON.parse(input)) {
    const where = `${resource.kind}/${resource.metadata && resource.metadata.name}`;
    try {
      if (resource.apiVersion !== "monitoring.coreos.com/v1" || !kinds.includes(resource.kind)) {
        throw new Error(`not a monitoring.coreos.com/v1 ${kinds.join(", ")}`);
      }
      new v1[resource.kind](resource).validate();
      console.log(`valid ${where}`);
    } catch (error) {
      failed = true;
      console.log(`invalid ${where}: ${error.message}`);
    }
  }
  process.exit(failed ? 1 : 0);
});
