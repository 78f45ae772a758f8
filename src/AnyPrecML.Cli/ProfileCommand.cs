using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Security.Cryptography;
using AnyPrecML.Evaluation;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec profile`: chooses one width per linear for an average width between seed and parent, greedily by the measured
/// drop per bit of the divergence from the parent's predictions on calibration text, and saves it beside the model (profile-{bits}bit.json), where `--bits 3.5` finds it.
/// </summary>
internal static class ProfileCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var tokenizer = CommonOptions.Tokenizer();
        var bits = new Option<double>("--bits", "-b") { Description = "Average bits per weight to choose widths for (seed..parent, e.g. 3.5).", Required = true };
        var calibration = new Option<string?>("--calibration") { Description = "Calibration text (one document per line) whose NLL the choice minimises." };
        var samples = QuantizeCommand.Samples();
        var seqLen = QuantizeCommand.SeqLen();
        var random = new Option<int?>("--random") { Description = "Write a random profile under the same budget instead, from this seed (the baseline a chosen profile must beat); needs no calibration." };
        var output = new Option<string?>("--output", "-o") { Description = "Profile file to write (default: profile-{bits}bit.json beside the model)." };
        var accuracy = CommonOptions.Accuracy();
        var json = CommonOptions.Json();
        var command = new Command("profile", "Choose one width per linear layer for an average width (e.g. 3.5 bits) from the same parent, by how much closer each bit brings the model's predictions on calibration text to the parent's (measured), and save it beside the model.")
        {
            model, tokenizer, bits, calibration, samples, seqLen, random, output, accuracy, json,
        };
        command.SetAction((r, ct) =>
        {
            string dir = r.GetValue(model)!;
            if (!Directory.Exists(dir) || !Models.LlamaCheckpoint.IsAnyPrecision(dir))
                throw new ArgumentException($"'{dir}' is not an any-precision model directory (make one with `anyprec quantize`).");
            double target = r.GetValue(bits);
            using var ap = AnyPrecisionModel.Open(dir);
            if (!(target >= ap.SeedBits && target <= ap.ParentBits)) throw new ArgumentException($"--bits {target.ToString(CultureInfo.InvariantCulture)} must be in this model's {ap.SeedBits}..{ap.ParentBits}.");
            string path = r.GetValue(output) ?? Path.Combine(dir, PrecisionProfile.FileName(target));
            var sw = Stopwatch.StartNew();
            PrecisionProfile profile;
            if (r.GetValue(random) is int seed)
            {
                if (r.GetValue(calibration) is not null) throw new ArgumentException("--random draws widths at random: drop --calibration.");
                profile = PrecisionProfileSearch.Random(ap, target, seed);
            }
            else
            {
                string text = r.GetValue(calibration) ?? throw new ArgumentException("choosing widths measures perplexity: give --calibration TEXT (or --random SEED for a random profile).");
                if (!File.Exists(text)) throw new FileNotFoundException($"Calibration text '{text}' does not exist.", text);
                var tok = LlamaTokenizerLoader.Load(ap.Checkpoint, r.GetValue(tokenizer));
                var set = CalibrationSet.FromText(tok, File.ReadAllText(text), r.GetValue(samples), r.GetValue(seqLen), ap.Config.MaxSeqLen, Path.GetFullPath(text));
                using var engine = new OnnxEngine(ap, new OnnxEngineOptions { Backend = CommonOptions.Backend(r.GetValue(accuracy)) });
                var err = r.Err();
                var chosen = PrecisionProfileSearch.Choose(ap, engine, set.Sequences, target, new Progress<string>(line => err.WriteLine($"profile: {line}")), ct);
                chosen.Provenance!["calibration"] = set.Source;
                chosen.Provenance["calibration_sha256"] = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(text)));
                profile = chosen;
            }
            profile.Save(ap, path);
            var counts = Enumerable.Range(ap.SeedBits, ap.ParentBits - ap.SeedBits + 1).ToDictionary(b => b.ToString(CultureInfo.InvariantCulture), b => profile.Widths.Count(w => w == b));
            if (r.GetValue(json))
                r.WriteJson(new { output = Path.GetFullPath(path), target_bits = target, average_bits = Math.Round(profile.AverageBits, 4), linears = counts, seconds = Math.Round(sw.Elapsed.TotalSeconds, 2) });
            else
                r.Out().WriteLine($"wrote {Path.GetFullPath(path)}: {profile.AverageBits:0.###} bits per weight for a target of {target.ToString(CultureInfo.InvariantCulture)}; linears per width: {string.Join(", ", counts.Select(c => $"{c.Key}: {c.Value}"))} ({sw.Elapsed.TotalSeconds:F1} s)");
            return Task.FromResult(0);
        });
        return command;
    }
}
