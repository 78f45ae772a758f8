using System.CommandLine;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>`anyprec synth`: a model in a real shape with random weights, for benchmarks.</summary>
internal static class SynthCommand
{
    public static Command Create()
    {
        var shape = new Option<string>("--shape") { Description = $"One of: {string.Join(", ", SyntheticModel.Shapes.Keys)}.", Required = true };
        shape.AcceptOnlyFromAmong([.. SyntheticModel.Shapes.Keys]);
        var output = new Option<string>("--output", "-o") { Description = "Directory to write.", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "Stored precision.", DefaultValueFactory = _ => "bf16" };
        dtype.AcceptOnlyFromAmong("f32", "f16", "bf16");
        var layers = new Option<int?>("--layers") { Description = "Override the number of layers (smaller benchmarks)." };
        var tokenizer = CommonOptions.Tokenizer();
        var overwrite = new Option<bool>("--overwrite") { Description = "Replace an existing output directory." };
        var command = new Command("synth", "Write a Hugging Face directory in a real model shape with random weights (for speed and memory benchmarks).")
        {
            shape, output, dtype, layers, tokenizer, overwrite,
        };
        command.SetAction(r =>
        {
            var c = SyntheticModel.ShapeNamed(r.GetValue(shape)!);
            if (r.GetValue(layers) is int n) c = c with { Layers = n };
            var dt = r.GetValue(dtype) switch { "f32" => DType.F32, "f16" => DType.F16, _ => DType.BF16 };
            SyntheticModel.Write(c, r.GetValue(output)!, dt, r.GetValue(tokenizer), overwrite: r.GetValue(overwrite), progress: ConsoleProgress.Bytes(r.Err(), "synth"));
            r.Out().WriteLine($"wrote {Path.GetFullPath(r.GetValue(output)!)}: {r.GetValue(shape)} ({c.ParameterCount:N0} parameters, {dt.Name()})");
            return 0;
        });
        return command;
    }
}
