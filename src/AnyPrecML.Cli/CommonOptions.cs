using System.CommandLine;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Cli;

/// <summary>Options shared by several commands, and the loading they imply.</summary>
internal static class CommonOptions
{
    public static Option<string> Model() => new("--model", "-m")
    {
        Description = "A llama2.c .bin file or a Hugging Face model directory.",
        Required = true,
    };

    public static Option<string?> Tokenizer() => new("--tokenizer")
    {
        Description = "Tokenizer to use: a SentencePiece tokenizer.model or a llama2.c tokenizer.bin (default: the one beside the model).",
    };

    public static Option<int?> Bits() => new("--bits", "-b")
    {
        Description = "Bit-width to run an any-precision model at (seed..parent; default: the parent width).",
    };

    /// <summary>--bits for the commands that also run precision profiles: a width, or an average width such as 3.5.</summary>
    public static Option<double?> Width() => new("--bits", "-b")
    {
        Description = "Bits to run an any-precision model at: a width seed..parent (default: the parent), or an average width such as 3.5, run by the precision profile saved beside the model for it (made by `anyprec profile`).",
    };

    public static Option<string?> Profile() => new("--profile")
    {
        Description = "A precision profile file (one width per linear, made by `anyprec profile`) to run the any-precision model at, instead of --bits.",
    };

    /// <summary>
    /// The profile that --bits <paramref name="bits"/> or --profile <paramref name="profilePath"/> names for <paramref name="model"/>
    /// (in <paramref name="directory"/>), or null for a uniform width: a whole --bits is one width; a fractional one is
    /// the profile saved beside the model for that average.
    /// </summary>
    public static PrecisionProfile? ResolveProfile(AnyPrecisionModel model, string directory, double? bits, string? profilePath) =>
        ProfilePath(directory, bits, profilePath) is { } path ? PrecisionProfile.Load(model, path) : null;

    /// <summary>The profile file <see cref="ResolveProfile"/> reads, or null for a uniform width.</summary>
    public static string? ProfilePath(string directory, double? bits, string? profilePath)
    {
        if (profilePath is not null)
        {
            if (bits is not null) throw new ArgumentException("--bits and --profile both choose the widths; give one.");
            return profilePath;
        }
        if (bits is not double b || b == Math.Floor(b)) return null;
        string path = Path.Combine(directory, PrecisionProfile.FileName(b));
        if (!File.Exists(path))
            throw new ArgumentException(string.Create(System.Globalization.CultureInfo.InvariantCulture,
                $"--bits {b}: no precision profile for that average beside the model ({path}); make one with `anyprec profile --model {directory} --bits {b} --calibration TEXT`, or give a whole width."));
        return path;
    }

    /// <summary>A whole --bits as a width (null when absent); a fractional one has a profile and no width.</summary>
    public static int? WholeBits(double? bits, PrecisionProfile? profile) => profile is null && bits is double b ? checked((int)b) : null;

    public static Option<string?> Engine() => new Option<string?>("--engine", "-e")
    {
        Description = "Engine for an any-precision model: onnx (ONNX Runtime with the bitplane operator; default) or reference (the managed engine on that width's dequantized weights).",
    }.AcceptOnlyFromAmong("onnx", "reference");

    public static Option<string> Accuracy() => new Option<string>("--accuracy")
    {
        Description = "Bitplane kernel arithmetic for the onnx engine on CPU: int8 (default; activations and tables quantized to 8 bits, integer products on every CPU path) or fp32.",
        DefaultValueFactory = _ => "int8",
    }.AcceptOnlyFromAmong("fp32", "int8");

    public static Option<string> Device() => new Option<string>("--device")
    {
        Description = "Where the onnx engine runs: auto (CUDA when the build has it and it starts, else the CPU with a warning), cpu, or cuda (an error if it cannot start).",
        DefaultValueFactory = _ => "auto",
    }.AcceptOnlyFromAmong("auto", "cpu", "cuda");

    public static Option<string?> KvCache() => new Option<string?>("--kv-cache")
    {
        Description = "What the onnx engine's key/value cache holds: bf16 (the default on the CPU: half the memory per sequence and half the bytes each step reads) or fp32 (the only type under CUDA).",
    }.AcceptOnlyFromAmong("bf16", "fp32");

    public static Option<int> MaxBatch() => new Option<int>("--max-batch")
    {
        Description = "Most concurrent requests whose decode steps at one width run as one pass (each linear then reads its planes once for all of them; with the int8 kernels every request still gets the tokens it would alone). 1 turns batching off.",
        DefaultValueFactory = _ => 16,
    };

    /// <summary>A --kv-cache value as the engine's option; null (the engine's default) when absent.</summary>
    public static KvCacheType? CacheType(string? kvCache) => kvCache switch { "fp32" => KvCacheType.Float32, "bf16" => KvCacheType.BFloat16, _ => null };

    /// <summary>
    /// The ONNX engine on <paramref name="device"/>. With `cuda` in a GPU build on a machine without the CUDA libraries,
    /// ONNX Runtime fails to load its provider: that is the user's choice of device, not an internal failure, so it is a
    /// one-line error (exit 2) that names the fallback (`auto` falls back by itself, with a warning).
    /// </summary>
    private static OnnxEngine OnnxEngineOn(AnyPrecisionModel ap, int bits, string? accuracy, string device, string? kvCache)
    {
        var options = new OnnxEngineOptions { Bits = bits, Backend = Backend(accuracy), Device = Enum.Parse<OnnxDevice>(device, ignoreCase: true), KvCacheType = CacheType(kvCache) };
        try { return new OnnxEngine(ap, options); }
        catch (Exception e) when (options.Device == OnnxDevice.Cuda && e is Microsoft.ML.OnnxRuntime.OnnxRuntimeException or DllNotFoundException or EntryPointNotFoundException)
        {
            throw new NotSupportedException($"--device cuda: ONNX Runtime's CUDA provider could not start ({e.Message.ReplaceLineEndings(" ")}); are the CUDA libraries installed? --device auto runs on the CPU instead, with a warning.", e);
        }
    }

    /// <summary>The bitplane backend for an --accuracy value: fp32 forces the CPU fp32 kernels; int8 is the default backend.</summary>
    public static Kernels.BitplaneBackend? Backend(string? accuracy) =>
        accuracy == "fp32" ? new Kernels.CpuBitplaneBackend(accuracy: Kernels.KernelAccuracy.Float32) : null;

    public static Option<bool> Json() => new("--json")
    {
        Description = "Print one JSON object instead of text.",
    };

    /// <summary>A loaded model ready to run: checkpoint, engine and tokenizer.</summary>
    public sealed class LoadedModel(LlamaCheckpoint checkpoint, IInferenceEngine engine, LlamaTokenizer tokenizer) : IDisposable
    {
        public LlamaCheckpoint Checkpoint { get; } = checkpoint;
        public IInferenceEngine Engine { get; } = engine;
        public LlamaTokenizer Tokenizer { get; } = tokenizer;
        public void Dispose() { Engine.Dispose(); Checkpoint.Dispose(); }
    }

    /// <summary>
    /// Loads a llama2.c file or HF directory into the reference engine, or an any-precision directory at
    /// <paramref name="bits"/> (default: its parent width) into <paramref name="engine"/>: "onnx" (default) or
    /// "reference" (that width dequantized into the managed engine).
    /// </summary>
    public static LoadedModel Load(string modelPath, string? tokenizerPath, double? bits = null, string? engine = null, string? accuracy = null,
        string device = "auto", TextWriter? log = null, string? profilePath = null, string? kvCache = null)
    {
        if (kvCache is not null && (engine == "reference" || !(Directory.Exists(modelPath) && LlamaCheckpoint.IsAnyPrecision(modelPath))))
            throw new ArgumentException("--kv-cache applies to the onnx engine on an any-precision model; the reference engine keeps fp32.");
        if (Directory.Exists(modelPath) && LlamaCheckpoint.IsAnyPrecision(modelPath))
        {
            var ap = AnyPrecisionModel.Open(modelPath);
            try
            {
                var tokenizer = LlamaTokenizerLoader.Load(ap.Checkpoint, tokenizerPath);
                var profile = ResolveProfile(ap, modelPath, bits, profilePath);
                int b = ap.CheckBits(WholeBits(bits, profile) ?? ap.ParentBits);
                IAnyPrecisionEngine e = engine == "reference" ? new AnyPrecisionReferenceEngine(ap, b) : OnnxEngineOn(ap, b, accuracy, device, kvCache);
                if (e is OnnxEngine { DeviceFallback: { } why }) log?.WriteLine($"warning: {why}");
                // Which kernels run is never silent: the path, its instruction set and the arithmetic.
                string widths = profile?.ToString() ?? $"{b} bits";
                log?.WriteLine($"engine: {(e is OnnxEngine ? "onnx" : "reference")}, {widths}, {e.Kernels}");
                return new LoadedModel(ap.Checkpoint, profile is null ? e : new ProfiledEngine(e, profile, ownsEngine: true), tokenizer);
            }
            catch
            {
                ap.Dispose();
                throw;
            }
        }
        if (bits is not null || profilePath is not null) throw new ArgumentException($"--bits and --profile apply to any-precision models; '{modelPath}' is not one.");
        if (engine == "onnx") throw new ArgumentException($"--engine onnx runs any-precision models; '{modelPath}' is not one (quantize it with `anyprec quantize`).");
        var checkpoint = LlamaCheckpoint.Open(modelPath);
        try
        {
            var tokenizer = LlamaTokenizerLoader.Load(checkpoint, tokenizerPath);
            return new LoadedModel(checkpoint, ReferenceEngine.FromCheckpoint(checkpoint), tokenizer);
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }
}
