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
        Description = "tokenizer.model to use (default: the one beside the model).",
    };

    public static Option<int?> Bits() => new("--bits", "-b")
    {
        Description = "Bit-width to run an any-precision model at (seed..parent; default: the parent width).",
    };

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

    /// <summary>
    /// The ONNX engine on <paramref name="device"/>. With `cuda` in a GPU build on a machine without the CUDA libraries,
    /// ONNX Runtime fails to load its provider: that is the user's choice of device, not an internal failure, so it is a
    /// one-line error (exit 2) that names the fallback (`auto` falls back by itself, with a warning).
    /// </summary>
    private static OnnxEngine OnnxEngineOn(AnyPrecisionModel ap, int bits, string? accuracy, string device)
    {
        var options = new OnnxEngineOptions { Bits = bits, Backend = Backend(accuracy), Device = Enum.Parse<OnnxDevice>(device, ignoreCase: true) };
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
    public static LoadedModel Load(string modelPath, string? tokenizerPath, int? bits = null, string? engine = null, string? accuracy = null,
        string device = "auto", TextWriter? log = null)
    {
        if (Directory.Exists(modelPath) && LlamaCheckpoint.IsAnyPrecision(modelPath))
        {
            var ap = AnyPrecisionModel.Open(modelPath);
            try
            {
                var tokenizer = LlamaTokenizerLoader.Load(ap.Checkpoint, tokenizerPath);
                int b = ap.CheckBits(bits ?? ap.ParentBits);
                IInferenceEngine e = engine == "reference" ? new AnyPrecisionReferenceEngine(ap, b) : OnnxEngineOn(ap, b, accuracy, device);
                if (e is OnnxEngine { DeviceFallback: { } why }) log?.WriteLine($"warning: {why}");
                // Which kernels run is never silent: the path, its instruction set and the arithmetic.
                log?.WriteLine(e is OnnxEngine onnx ? $"engine: onnx, {b} bits, bitplane kernels: {onnx.Operator.Backend.Name}" : $"engine: reference (fp32, {b}-bit weights dequantized)");
                return new LoadedModel(ap.Checkpoint, e, tokenizer);
            }
            catch
            {
                ap.Dispose();
                throw;
            }
        }
        if (bits is not null) throw new ArgumentException($"--bits applies to any-precision models; '{modelPath}' is not one.");
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

/// <summary>Progress on standard error: a redrawn bar on a terminal, a line per tenth when redirected.</summary>
internal sealed class ConsoleProgress<T>(TextWriter writer, string label, Func<T, (long Done, long Total)> measure) : IProgress<T>
{
    private long _lastTenth = -1;
    private readonly bool _terminal = ReferenceEquals(writer, Console.Error) && !Console.IsErrorRedirected;

    public void Report(T value)
    {
        var (done, total) = measure(value);
        if (total <= 0) return;
        if (_terminal)
        {
            int width = 30, filled = (int)(width * done / total);
            writer.Write($"\r{label} [{new string('#', filled)}{new string('.', width - filled)}] {done}/{total}");
            if (done == total) writer.WriteLine();
            return;
        }
        long tenth = 10 * done / total;
        if (tenth == _lastTenth) return;
        _lastTenth = tenth;
        writer.WriteLine($"{label}: {done}/{total}");
    }
}
