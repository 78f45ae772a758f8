using System.CommandLine;
using System.Diagnostics;
using System.Security.Cryptography;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec quantize`: one n-bit parent that serves every width from seed to n.</summary>
internal static class QuantizeCommand
{
    public static Option<string> Sensitivity() => new("--sensitivity")
    {
        Description = "Weights of the k-means: fisher (summed squared gradients), hessian (mean squared activations), both need --calibration; or uniform.",
        DefaultValueFactory = _ => "hessian",
    };

    public static Option<int> Samples() => new("--samples") { Description = "Calibration sequences at most.", DefaultValueFactory = _ => 100 };
    public static Option<int> SeqLen() => new("--seq-len") { Description = "Tokens per calibration sequence (capped by the model's context).", DefaultValueFactory = _ => 512 };
    public static Option<ulong> Seed() => new("--seed") { Description = "Seed of the k-means++ starts (--seed-method kmeans).", DefaultValueFactory = _ => 0UL };

    public static Option<string> SeedMethodOption() => new Option<string>("--seed-method")
    {
        Description = "Seed clustering: exact (optimal weighted 1-D k-means by dynamic programming) or kmeans (greedy k-means++ and Lloyd, the usual heuristic).",
        DefaultValueFactory = _ => "exact",
    }.AcceptOnlyFromAmong("exact", "kmeans");

    public static SeedMethod ParseSeedMethod(string? name) => name == "kmeans" ? SeedMethod.KMeans : SeedMethod.Exact;

    public static Command Create()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var json = CommonOptions.Json();
        var calibration = new Option<string?>("--calibration") { Description = "Calibration text file (one document per line)." };
        var output = new Option<string>("--output", "-o") { Description = "Directory to write the any-precision model to.", Required = true };
        var seedBits = new Option<int>("--seed-bits") { Description = "Seed width (2^seed centroids per row).", DefaultValueFactory = _ => 3 };
        var parentBits = new Option<int>("--parent-bits") { Description = "Parent width n (≤ 8).", DefaultValueFactory = _ => 8 };
        var sensitivity = Sensitivity();
        sensitivity.AcceptOnlyFromAmong(SensitivitySources.Kinds);
        var samples = Samples();
        var seqLen = SeqLen();
        var seed = Seed();
        var seedMethod = SeedMethodOption();
        var threads = new Option<int>("--threads") { Description = "Threads (0: all cores).", DefaultValueFactory = _ => 0 };
        var overwrite = new Option<bool>("--overwrite") { Description = "Replace an existing output directory." };
        var command = new Command("quantize", "Quantize a model once into an any-precision parent serving every width from --seed-bits to --parent-bits.")
        {
            model, tokenizer, calibration, output, seedBits, parentBits, sensitivity, samples, seqLen, seedMethod, seed, threads, overwrite, json,
        };
        command.SetAction((r, ct) =>
        {
            var options = new QuantizerOptions
            {
                SeedBits = r.GetValue(seedBits), ParentBits = r.GetValue(parentBits),
                SeedMethod = ParseSeedMethod(r.GetValue(seedMethod)), RandomSeed = r.GetValue(seed), MaxDegreeOfParallelism = r.GetValue(threads),
            }.Validated();
            var sw = Stopwatch.StartNew();
            using var source = LlamaCheckpoint.Open(r.GetValue(model)!);
            var (sens, summary) = CreateSensitivity(r, source, r.GetValue(sensitivity)!, r.GetValue(calibration), r.GetValue(tokenizer), r.GetValue(samples), r.GetValue(seqLen), ct);
            string outDir = r.GetValue(output)!;
            var progress = new ConsoleProgress<QuantizeProgress>(r.Err(), "quantize", p => (p.Done, p.Total), "layers");
            AnyPrecisionQuantizer.Quantize(source, outDir, sens, options, summary, progress, r.GetValue(overwrite), ct);
            long bytes = Directory.GetFiles(outDir).Sum(f => new FileInfo(f).Length);
            int? documents = summary?["samples"]?.GetValue<int>();
            long? calibrationTokens = summary?["tokens"]?.GetValue<long>();
            string seedName = options.SeedMethod == SeedMethod.Exact ? "exact" : "kmeans";
            if (r.GetValue(json))
                r.WriteJson(new { output = Path.GetFullPath(outDir), seed_bits = options.SeedBits, parent_bits = options.ParentBits, seed_method = seedName, sensitivity = sens.Kind,
                    calibration_documents = documents, calibration_tokens = calibrationTokens, seconds = Math.Round(sw.Elapsed.TotalSeconds, 2), bytes });
            else
                r.Out().WriteLine($"wrote {Path.GetFullPath(outDir)}: {options.SeedBits}..{options.ParentBits} bits, {seedName} seed, {sens.Kind} sensitivity"
                    + (documents is null ? "" : $" ({documents} calibration documents, {calibrationTokens:N0} tokens)") + $", {bytes:N0} bytes, {sw.Elapsed.TotalSeconds:F1} s");
            return Task.FromResult(0);
        });
        return command;
    }

    /// <summary>The sensitivity source for <paramref name="kind"/>, running calibration on <paramref name="source"/> when it needs it.</summary>
    internal static (ISensitivitySource, System.Text.Json.Nodes.JsonObject?) CreateSensitivity(ParseResult r, LlamaCheckpoint source, string kind,
        string? calibrationPath, string? tokenizerPath, int samples, int seqLen, CancellationToken ct)
    {
        if (kind == "uniform") return SensitivitySources.Create(kind, null!, null);
        if (calibrationPath is null) throw new ArgumentException($"--sensitivity {kind} needs --calibration TEXT.");
        if (!File.Exists(calibrationPath)) throw new FileNotFoundException($"Calibration text '{calibrationPath}' does not exist.", calibrationPath);
        var tokenizer = LlamaTokenizerLoader.Load(source, tokenizerPath);
        string text = File.ReadAllText(calibrationPath);
        var set = CalibrationSet.FromText(tokenizer, text, samples, seqLen, source.Config.MaxSeqLen, Path.GetFullPath(calibrationPath));
        var progress = ConsoleProgress.Steps(r.Err(), $"{kind} calibration", "sequences");
        var (sens, summary) = SensitivitySources.Create(kind, ReferenceEngine.FromCheckpoint(source), set, progress, ct);
        summary!["sha256"] = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(calibrationPath)));
        return (sens, summary);
    }
}
