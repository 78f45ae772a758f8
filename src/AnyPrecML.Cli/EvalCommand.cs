using System.CommandLine;
using System.Globalization;
using System.Text;
using AnyPrecML.Evaluation;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec eval`: perplexity against bits, the paper's main table, with plot and CSV.</summary>
internal static class EvalCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "The any-precision model directory.", Required = true };
        var original = new Option<string>("--original") { Description = "The model it was quantized from (fp32 column and baselines).", Required = true };
        var tokenizer = CommonOptions.Tokenizer();
        var text = new Option<string>("--text") { Description = "Text file to evaluate.", Required = true };
        var context = new Option<int>("--context", "-c") { Description = "Tokens per window (0: the model's context).", DefaultValueFactory = _ => 0 };
        var bosPerLine = new Option<bool>("--bos-per-line") { Description = "Each non-empty line is a document starting with BOS." };
        var truncate = PerplexityCommand.Truncate();
        var baselines = new Option<bool>("--baselines") { Description = "Also evaluate each width quantized on its own (exact weighted k-means, 2^b centroids) and RTN." };
        var calibration = new Option<string?>("--calibration") { Description = "Calibration text for the independent baseline (default: the one recorded in the model)." };
        var samples = QuantizeCommand.Samples();
        var seqLen = QuantizeCommand.SeqLen();
        var plot = new Option<string?>("--plot") { Description = "Write a PNG plot of perplexity against bits." };
        var csv = new Option<string?>("--csv") { Description = "Write the table as CSV." };
        var json = CommonOptions.Json();
        var command = new Command("eval", "Perplexity of an any-precision model at every width, next to fp32 and (with --baselines) independent k-means and RTN.")
        {
            model, original, tokenizer, text, context, bosPerLine, truncate, baselines, calibration, samples, seqLen, plot, csv, json,
        };
        command.SetAction((r, ct) =>
        {
            using var ap = AnyPrecisionModel.Open(r.GetValue(model)!);
            using var source = LlamaCheckpoint.Open(r.GetValue(original)!);
            if (source.Config with { RopeLayout = RopeLayout.HalfSplit } != ap.Config)
                throw new ArgumentException($"--original '{source.SourcePath}' does not have the any-precision model's shape.");
            var tok = LlamaTokenizerLoader.Load(ap.Checkpoint, r.GetValue(tokenizer));
            string textPath = r.GetValue(text)!;
            if (!File.Exists(textPath)) throw new FileNotFoundException($"Text file '{textPath}' does not exist.", textPath);
            List<int[]> sequences;
            using (var reader = new StreamReader(textPath)) sequences = PerplexityCommand.Sequences(tok, reader, r.GetValue(bosPerLine), r.GetValue(truncate), r.GetValue(context), ap.Config.MaxSeqLen);

            ISensitivitySource? sens = null;
            if (r.GetValue(baselines))
            {
                string? calib = r.GetValue(calibration) ?? ap.Calibration?["source"]?.GetValue<string>();
                var samplesUsed = ap.Calibration?["samples"]?.GetValue<int>() ?? r.GetValue(samples);
                var seqLenUsed = ap.Calibration?["seq_len"]?.GetValue<int>() ?? r.GetValue(seqLen);
                (sens, _) = QuantizeCommand.CreateSensitivity(r, source, ap.SensitivityKind, calib, r.GetValue(tokenizer), samplesUsed, seqLenUsed, ct);
            }
            var progress = new ConsoleProgress<QualityProgress>(r.Err(), "eval", p => (p.Done, p.Total));
            var report = QualityEvaluator.Evaluate(ap, source, sequences, sens, 0, SeedMethod.Exact, progress, ct);

            if (r.GetValue(csv) is { } csvPath) AtomicFile.WriteText(csvPath, Csv(report));
            if (r.GetValue(plot) is { } plotPath) Plot(report, plotPath, Path.GetFileName(Path.GetFullPath(r.GetValue(model)!).TrimEnd('/')));
            if (r.GetValue(json))
            {
                r.WriteJson(new
                {
                    fp32 = Math.Round(report.Fp32, 4),
                    rows = report.Rows.Select(x => x.Independent is null
                        ? (object)new { bits = x.Bits, anyprecision = Math.Round(x.AnyPrecision, 4) }
                        : new { bits = x.Bits, anyprecision = Math.Round(x.AnyPrecision, 4), independent = Math.Round(x.Independent.Value, 4), rtn = Math.Round(x.Rtn!.Value, 4) }).ToArray(),
                    tokens = report.Tokens,
                    context = report.ContextLength,
                    peak_resident_bytes = ScoreCommand.PeakResidentBytes(),
                });
            }
            else r.Out().Write(Table(report));
            return Task.FromResult(0);
        });
        return command;
    }

    internal static string Table(QualityReport report)
    {
        var sb = new StringBuilder();
        bool baselines = report.Rows.Any(x => x.Independent is not null);
        sb.AppendLine(baselines ? "| bits | any-precision | independent | RTN |" : "| bits | any-precision |");
        sb.AppendLine(baselines ? "|---:|---:|---:|---:|" : "|---:|---:|");
        foreach (var x in report.Rows)
            sb.AppendLine(baselines
                ? FormattableString.Invariant($"| {x.Bits} | {x.AnyPrecision:F3} | {x.Independent:F3} | {x.Rtn:F3} |")
                : FormattableString.Invariant($"| {x.Bits} | {x.AnyPrecision:F3} |"));
        sb.AppendLine(FormattableString.Invariant($"| fp32 | {report.Fp32:F3} |{(baselines ? " | |" : "")}"));
        return sb.ToString();
    }

    private static string Csv(QualityReport report)
    {
        var sb = new StringBuilder("bits,anyprecision,independent,rtn,fp32\n");
        foreach (var x in report.Rows)
            sb.AppendLine(string.Join(',', x.Bits, F(x.AnyPrecision), F(x.Independent), F(x.Rtn), F(report.Fp32)));
        return sb.ToString();
        static string F(double? v) => v?.ToString("R", CultureInfo.InvariantCulture) ?? "";
    }

    private static void Plot(QualityReport report, string path, string title)
    {
        var plt = new ScottPlot.Plot();
        double[] bits = report.Rows.Select(x => (double)x.Bits).ToArray();
        var ap = plt.Add.Scatter(bits, report.Rows.Select(x => x.AnyPrecision).ToArray());
        ap.LegendText = "any-precision (one parent)";
        if (report.Rows.All(x => x.Independent is not null))
        {
            plt.Add.Scatter(bits, report.Rows.Select(x => x.Independent!.Value).ToArray()).LegendText = "independent (exact k-means per width)";
            plt.Add.Scatter(bits, report.Rows.Select(x => x.Rtn!.Value).ToArray()).LegendText = "RTN";
        }
        var fp = plt.Add.HorizontalLine(report.Fp32);
        fp.LegendText = "fp32";
        fp.LinePattern = ScottPlot.LinePattern.Dashed;
        plt.Title($"{title}: perplexity against bits");
        plt.XLabel("bits");
        plt.YLabel("perplexity");
        plt.ShowLegend();
        string tmp = path + ".tmp.png";
        plt.SavePng(tmp, 800, 500);
        File.Move(tmp, path, overwrite: true);
    }
}
