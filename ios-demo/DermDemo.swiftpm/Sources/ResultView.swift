import DermCore
import SwiftUI

/// One result, as the Android and web apps show it: each level's probabilities (labels named by the manifest), each
/// binary task's call at the chosen operating point with the sensitivity and specificity it was measured at (or
/// "does not apply"), the top training classes and the latency.
struct ResultView: View {
    let manifest: Manifest
    let source: String
    let classified: Classified

    var body: some View {
        let p = classified.prediction
        VStack(alignment: .leading, spacing: 10) {
            Text(String(format: "From the %@, in %.0f ms", source, classified.millis)).font(.caption)
            ForEach(Array(p.levels.keys), id: \.self) { level in
                let spec = manifest.output(named: "probs_\(level)")
                let probs = p.levels[level] ?? OrderedMap<Double>()
                Text("\(probs.count) classes").font(.headline)
                ForEach(Array(probs.keys), id: \.self) { label in
                    bar(name(label, in: spec), probs[label] ?? 0, top: probs[label] == probs.values.max())
                }
            }
            Text("Binary tasks").font(.headline)
            ForEach(manifest.tasks.filter { p.decisions.contains(key: $0.id) }, id: \.id) { task in
                decision(task, p.decisions[task.id]!)
            }
            Text("Most likely training classes").font(.headline)
            let training = manifest.outputs.first { $0.kind == "training" }
            ForEach(p.topClasses, id: \.label) { top in
                bar(name(top.label, in: training), top.probability, top: false)
            }
        }
    }

    private func name(_ label: String, in spec: OutputSpec?) -> String {
        guard let spec, let i = spec.labels.firstIndex(of: label), i < spec.names.count else { return label }
        return spec.names[i]
    }

    private func bar(_ label: String, _ p: Double, top: Bool) -> some View {
        HStack {
            Text(label).font(.footnote).frame(maxWidth: .infinity, alignment: .leading)
            ProgressView(value: min(max(p, 0), 1)).tint(top ? .red : .indigo).frame(width: 100)
            Text(String(format: "%.1f%%", 100 * p)).font(.footnote.monospacedDigit()).frame(width: 56, alignment: .trailing)
        }
    }

    private func decision(_ task: TaskSpec, _ d: Decision) -> some View {
        let call = d.positive ? "above" : "below"
        var line = String(format: "%@: %.3f, %@ %.3f", task.name, d.probability, call, d.threshold)
        if let sens = d.sensitivity, let spec = d.specificity, let target = Double(d.operatingPoint) {
            line += String(
                format: ", the threshold for %.0f%% sensitivity (measured: sensitivity %.2f, specificity %.2f on the "
                    + "run's held-out images)", target * 100, sens, spec
            )
        } else {
            line += " (\(d.operatingPoint))"
        }
        if !d.applies {
            line += ". Does not apply: the image is unlikely to be \(task.condition ?? "in this task")."
        }
        return Text(line)
            .font(.footnote)
            .foregroundStyle(d.applies ? (d.positive ? Color.red : Color.primary) : Color.secondary)
    }
}
